"""Where a chunked-prefill step's time goes (Llama-3-8B shape, bf16, random weights, one GPU):
64 streams decoding while one 4,000-token prompt is prefilled in 512-token chunks beside them.
Prints each step's wall ms and torch.profiler's top operators by host and by device time.

    python bench/profile_mixed_step.py [--chunk 512]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench_prefix import _seq, make_engine
from common import llama3_8b_dir, step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()
    engine = make_engine(llama3_8b_dir(max_position_embeddings=16384), False,
                         max_batch_prefill_tokens=args.chunk)
    rng = np.random.default_rng(0)
    for profiled in (False, True):  # the first round compiles and warms up
        for i in range(64):
            engine.add(_seq(i + 1000 * profiled, rng.integers(10, 100000, 64).tolist(), 200))
        while engine.stats().num_waiting:
            step(engine)
        for _ in range(5):
            step(engine)
        engine.add(_seq(50_000 + profiled, rng.integers(10, 100000, 4000).tolist(), 2))
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA])
        step_ms = []
        with profiler if profiled else torch.profiler.record_function("warm-up"):
            for _ in range(10):
                started = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                step_ms.append(1e3 * (time.perf_counter() - started))
        if profiled:
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=12))
        print("step ms", " ".join(f"{ms:.1f}" for ms in step_ms))
        while engine.has_work():
            step(engine)


if __name__ == "__main__":
    main()
