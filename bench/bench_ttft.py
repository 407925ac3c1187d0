"""Time to first token for 128, 1,024 and 2,048-token prompts (batch 1): our engine's prefill
step (Triton kernels) vs HF transformers generate(max_new_tokens=1) vs the roofline.

    python bench/bench_ttft.py [--lengths 128,1024,2048] [--repeats 5]
        [--prefill-cuda-graphs 16,...,512]

"ours" runs with the server's prefill CUDA graphs (or the list given); "eager" without any.
"""
from __future__ import annotations

import argparse
import random
import statistics

import torch

from common import (LLAMA3_8B, Timer, hf_llama3_8b, llama3_8b_dir, measure_ceilings, param_bytes,
                    print_table, release_gpu_memory)


def engine_ttft_ms(lengths, repeats, prefill_cuda_graphs: str | None):
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine
    from textgen_backend.sampling.params import SamplingParams, StoppingParams
    from textgen_backend.engine.sequence import Sequence

    longest = max(lengths)
    config = EngineConfig(model_id=str(llama3_8b_dir()), load_format="dummy", dtype="bfloat16",
                          max_input_tokens=longest, max_total_tokens=longest + 8,
                          max_batch_prefill_tokens=longest, max_batch_total_tokens=4 * longest,
                          **({} if prefill_cuda_graphs is None
                             else {"prefill_cuda_graphs": prefill_cuda_graphs}))
    engine = Engine(config, config.model_id)
    rng = random.Random(0)
    results = {}
    for n in lengths:
        times = []
        for r in range(repeats + 2):  # two warm-ups: Triton compiles per shape bucket
            seq = Sequence(n * 100 + r, [rng.randrange(128000) for _ in range(n)],
                           SamplingParams(), StoppingParams(max_tokens=1, ignore_eos=True))
            with Timer() as t:
                engine.add(seq)
                while not seq.output_ids:
                    engine.step()
            times.append(t.seconds)
        results[n] = 1e3 * statistics.median(times[2:])
    del engine
    release_gpu_memory()
    return results


def hf_ttft_ms(lengths, repeats):
    model = hf_llama3_8b()
    results = {}
    for n in lengths:
        ids = torch.randint(0, 128000, (1, n), device="cuda")
        times = []
        for _ in range(repeats + 1):
            with Timer() as t:
                model.generate(ids, max_new_tokens=1, do_sample=False)
            times.append(t.seconds)
        results[n] = 1e3 * statistics.median(times[1:])
    del model
    release_gpu_memory()
    return results


def prefill_floor_ms(n, ceilings):
    c = LLAMA3_8B
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    matmul_params = param_bytes(c) / 2 - 2 * c["vocab_size"] * h  # without embedding, lm_head
    flops = 2 * matmul_params * n + 2 * c["vocab_size"] * h       # lm_head on the last token
    flops += 2 * 2 * (n * n / 2) * c["num_attention_heads"] * c["head_dim"] * layers
    return 1e3 * max(flops / ceilings["flops"], param_bytes(c) / ceilings["bandwidth"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="128,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--prefill-cuda-graphs", default=None,
                        help="token counts for our engine (default: the server's)")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    ceilings = measure_ceilings()
    ours = engine_ttft_ms(lengths, args.repeats, args.prefill_cuda_graphs)
    eager = engine_ttft_ms(lengths, args.repeats, "0")
    hf = {} if args.skip_hf else hf_ttft_ms(lengths, args.repeats)
    rows = []
    for n in lengths:
        floor = prefill_floor_ms(n, ceilings)
        hf_ms = hf.get(n, float("nan"))
        rows.append([n, ours[n], eager[n], floor, f"{100 * floor / ours[n]:.0f}%", hf_ms,
                     f"{hf_ms / ours[n]:.2f}x"])
    print(f"\nmeasured: copy {ceilings['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['flops'] / 1e12:.0f} TFLOP/s")
    print_table("TTFT (in-process, batch 1), Llama-3-8B shape, bf16",
                ["prompt tokens", "ours ms", "eager prefill ms", "floor ms", "% of roofline", "HF ms", "speedup vs HF"],
                rows)


if __name__ == "__main__":
    main()
