"""Decode ms/token at batch 1, 8, 32, 64, 128 with a 1k context: our engine (Triton kernels,
CUDA graphs; async scheduling on, then off on the same engine) vs HF transformers generate
(sdpa) vs the roofline, one GPU, one run.

    python bench/bench_decode.py [--batches 1,8,32,64,128] [--context 1024] [--steps 64]
"""
from __future__ import annotations

import argparse
import dataclasses
import random

import torch

from common import (LLAMA3_8B, Timer, decode_headroom, hf_llama3_8b, kv_bytes_per_token,
                    llama3_8b_dir, measure_ceilings, param_bytes, print_table,
                    release_gpu_memory, time_decode)


def engine_decode_ms(batches, context, steps, max_batch):
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine

    prefill_tokens = max(8192, context)
    total = context + steps + decode_headroom(max_batch, context, prefill_tokens)
    config = EngineConfig(model_id=str(llama3_8b_dir()), load_format="dummy", dtype="bfloat16",
                          max_input_tokens=context, max_total_tokens=total,
                          max_batch_prefill_tokens=prefill_tokens,
                          max_batch_total_tokens=max_batch * total,
                          # every sequence joins before timing starts (see bench/RESULTS.md)
                          waiting_served_ratio=0.0)
    engine = Engine(config, config.model_id)
    rng = random.Random(0)
    results = {}
    for batch in batches:
        ms, graph_ms = time_decode(engine, batch, context, steps, rng)
        # the same engine with each step's tokens read before the next is scheduled
        engine.config = dataclasses.replace(config, async_scheduling=False)
        one_by_one, _ = time_decode(engine, batch, context, steps, rng)
        engine.config = config
        results[batch] = ms, graph_ms, one_by_one
    peak = torch.cuda.max_memory_allocated() / 2**30
    kv_tokens = engine.limits.max_batch_total_tokens
    del engine
    release_gpu_memory()
    return results, peak, kv_tokens


def hf_decode_ms(batches, context, steps):
    model = hf_llama3_8b()
    results = {}
    for batch in batches:
        ids = torch.randint(0, 128000, (batch, context), device="cuda")

        def generate(new):
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

        generate(2)
        with Timer() as short:
            generate(1)
        with Timer() as long:
            generate(1 + steps)
        results[batch] = 1e3 * (long.seconds - short.seconds) / steps
    del model
    release_gpu_memory()
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--hf-steps", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ceilings = measure_ceilings()
    ours, peak, kv_tokens = engine_decode_ms(batches, args.context, args.steps, max(batches))
    hf = {} if args.skip_hf else hf_decode_ms(batches, args.context, args.hf_steps)
    weights = param_bytes(LLAMA3_8B)
    rows = []
    for batch in batches:
        ctx = args.context + args.steps // 2
        floor_bytes = weights + batch * ctx * kv_bytes_per_token(LLAMA3_8B)
        floor_ms = 1e3 * max(floor_bytes / ceilings["bandwidth"],
                             batch * weights / ceilings["flops"])  # 2 FLOPs / bf16 weight
        ms, graph_ms, one_by_one = ours[batch]
        hf_ms = hf.get(batch, float("nan"))
        rows.append([batch, ms, one_by_one, graph_ms, batch * 1e3 / ms, floor_ms,
                     f"{100 * floor_ms / ms:.0f}%", hf_ms, batch * 1e3 / hf_ms,
                     f"{hf_ms / ms:.1f}x"])
    print(f"\nmeasured: copy {ceilings['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['flops'] / 1e12:.0f} TFLOP/s; weights {weights / 1e9:.2f} GB; "
          f"peak GPU memory (ours) {peak:.1f} GiB; KV cache {kv_tokens} tokens")
    print_table(f"Decode, Llama-3-8B shape, bf16, context {args.context}",
                ["batch", "ours ms/step", "--no-async-scheduling ms/step",
                 "GPU ms (graph replay)", "ours tok/s", "floor ms",
                 "% of roofline",
                 "HF ms/step", "HF tok/s", "speedup vs HF"], rows)


if __name__ == "__main__":
    main()
