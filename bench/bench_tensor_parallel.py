"""Tensor parallelism on several GPUs of one host, one run: decode ms/step of the engine at
each shard count and batch size (every rank replays its CUDA graph; rank 0 samples), against
the roofline measured in the same run (each GPU reads its share of the weights and of the KV
cache at the measured copy bandwidth; the all-reduces are what the gap is made of).

    python bench/bench_tensor_parallel.py --model 8b --shards 1,2,4 [--batches 1,8,64]
    python bench/bench_tensor_parallel.py --model 70b --shards 4,8

Random weights of the real shapes (--load-format dummy): Llama-3-8B, Llama-3-70B (80 layers,
hidden 8192, MLP 28672, 64 heads, 8 KV heads, vocabulary 128256). The target (issue 22):
>= 1.6x at 2 shards, batch 1, on the 8B shape.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import time

import torch

from common import (LLAMA3_8B, Timer, decode_step_ms, kv_bytes_per_token, llama3_8b_dir,
                    measure_ceilings, param_bytes, print_table, release_gpu_memory)
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.params import SamplingParams, StoppingParams

LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}
SHAPES = {"8b": LLAMA3_8B, "70b": LLAMA3_70B}


def decode_ms(engine: Engine, batch: int, context: int, steps: int, rng) -> float:
    seqs = [Sequence(1000 * batch + i, [rng.randrange(128000) for _ in range(context)],
                     SamplingParams(), StoppingParams(max_tokens=steps + 16, ignore_eos=True))
            for i in range(batch)]
    return decode_step_ms(engine, seqs, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SHAPES, default="8b")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    shape = SHAPES[args.model]
    shard_counts = [int(s) for s in args.shards.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"commit {commit}; {torch.cuda.device_count()} x {torch.cuda.get_device_name()}; "
          f"Llama-3-{args.model.upper()} shape, bf16, context {args.context}, "
          f"{args.steps} timed steps")
    ceilings = measure_ceilings()
    bandwidth = ceilings["bandwidth"]
    print(f"measured: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['flops'] / 1e12:.0f} TFLOP/s (GPU 0)")
    model_dir = llama3_8b_dir(**{k: v for k, v in shape.items() if k != "architectures"})
    rng = random.Random(0)
    rows, single = [], {}
    for shards in shard_counts:
        config = EngineConfig(model_id=str(model_dir), load_format="dummy", num_shard=shards,
                              dtype="bfloat16", max_lora_rank=0, max_total_tokens=4096,
                              max_input_tokens=2048, cuda_graphs=",".join(map(str, batches)),
                              max_batch_total_tokens=max(batches) * (args.context + 64 + 16),
                              disable_grammar_support=True, prefill_cuda_graphs="0")
        with Timer() as load:
            engine = Engine(config, model_dir)
        print(f"{shards} shards: engine ready in {load.seconds:.0f} s")
        try:
            for batch in batches:
                decode_ms(engine, batch, args.context, 4, rng)  # warm-up: compiled, captured
                ms = decode_ms(engine, batch, args.context, args.steps, rng)
                if shards == 1:
                    single[batch] = ms
                per_gpu = (param_bytes(shape) + batch * args.context
                           * kv_bytes_per_token(shape)) / shards
                roofline = 1e3 * per_gpu / bandwidth
                speedup = (f"{single[batch] / ms:.2f}x" if batch in single and shards > 1
                           else "")
                rows.append([shards, batch, f"{ms:.2f}", f"{roofline:.2f}",
                             f"{100 * roofline / ms:.0f}%", speedup])
        finally:
            engine.close()
            del engine
            release_gpu_memory()
            time.sleep(2)  # the workers' GPU memory goes with their processes
    print_table(f"decode ms/step, Llama-3-{args.model.upper()} shape (commit {commit})",
                ["shards", "batch", "ms/step", "roofline ms", "of roofline",
                 "speed-up vs 1 shard"], rows)


if __name__ == "__main__":
    main()
