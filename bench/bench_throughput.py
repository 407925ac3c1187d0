"""Offline throughput on 1,000 synthetic ShareGPT-shaped requests (lognormal lengths, mean ~200
input / ~180 output tokens, fixed seed, EOS ignored): our engine in-process (async scheduling on,
then the same engine with it off), the same engine through tritonserver with concurrent gRPC
streaming clients, and HF transformers generate.

    python bench/bench_throughput.py [--requests 1000] [--clients 8] [--streams 48]
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (LLAMA3_8B, Timer, engine_steps, hf_llama3_8b, llama3_8b_dir,
                    measure_ceilings, print_table, read_metrics, release_gpu_memory,
                    sharegpt_workload, synthetic_prompt, write_synthetic_tokenizer)

MAX_LEN = 1024


def engine_config(model_dir: Path, **overrides):
    from textgen_backend.config import EngineConfig

    return EngineConfig(model_id=str(model_dir), load_format="dummy", dtype="bfloat16",
                        max_input_tokens=MAX_LEN, max_total_tokens=2 * MAX_LEN,
                        max_batch_prefill_tokens=8192, max_concurrent_requests=1024,
                        max_batch_size=512, cuda_graphs="1,2,4,8,16,32,64,128,256,384,512",
                        **overrides)


def in_process(model_dir: Path, requests, profile_steps: int = 40,
               compare_sync: bool = True) -> list[dict]:
    """The workload in-process with async scheduling, then (compare_sync) again on the same
    engine with it switched off (new random prompts, so that the prefix cache holds none)."""
    from textgen_backend.engine.engine import Engine
    from textgen_backend.sampling.params import SamplingParams, StoppingParams
    from textgen_backend.engine.sequence import Sequence

    engine = Engine(engine_config(model_dir), model_dir)
    warm = Sequence(-1, [1] * 64, SamplingParams(), StoppingParams(max_tokens=8, ignore_eos=True))
    engine.add(warm)
    while engine.has_work():
        engine.step()
    busy = gpu_busy_fraction(engine, _sequences(requests, 0)[:256], profile_steps)
    results = []
    for seed, async_scheduling in [(1, True), (2, False)][:1 + compare_sync]:
        engine.config = dataclasses.replace(engine.config, async_scheduling=async_scheduling)
        seqs = _sequences(requests, seed)
        executed = []  # (is_prefill, sequences, seconds of its step() call, forward seconds)
        with Timer() as t:
            for s in seqs:
                engine.add(s)
            while engine.has_work():
                started = time.perf_counter()
                engine.step()
                step = engine.last_step
                if step is not None:
                    executed.append((step.is_prefill, step.batch_size,
                                     time.perf_counter() - started, step.forward_seconds))
        steps = {("prefill" if kind else "next_token"): [
            len(e), sum(x[2] for x in e), sum(x[3] for x in e), sum(x[1] for x in e)]
            for kind in (True, False) for e in [[x for x in executed if x[0] == kind]]}
        results.append({"seconds": t.seconds, "tokens": sum(len(s.output_ids) for s in seqs),
                        "busy": busy, "steps": steps, "async": async_scheduling,
                        "kv_tokens": engine.limits.max_batch_total_tokens,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
    del engine
    release_gpu_memory()
    return results


def _sequences(requests, seed: int) -> list:
    from textgen_backend.engine.sequence import Sequence
    from textgen_backend.sampling.params import SamplingParams, StoppingParams

    rng = np.random.default_rng(seed)
    return [Sequence(i, rng.integers(0, 128000, n_in).tolist(), SamplingParams(),
                     StoppingParams(max_tokens=n_out, ignore_eos=True))
            for i, (n_in, n_out) in enumerate(requests)]


def gpu_busy_fraction(engine, seqs, steps: int) -> float:
    """GPU-busy share of wall time over `steps` decode steps of a full batch (a profiled
    copy of the first sequences; the profiler's own overhead makes this a lower bound)."""
    from torch.profiler import ProfilerActivity, profile

    from textgen_backend.engine.sequence import Sequence

    for s in seqs:
        engine.add(Sequence(-2 - s.seq_id, s.prompt_ids, s.sampling, s.stopping))
    while engine.scheduler.waiting:
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with Timer() as t:
            for _ in range(steps):
                engine.step()
    busy_us = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA")
    for s in seqs:
        engine.abort(-2 - s.seq_id, "cancelled")
    engine.step()
    return busy_us / 1e6 / t.seconds


def _started(_) -> None:
    time.sleep(0.5)  # holds its worker, so that every worker has started and imported


def _client_worker(args):
    """Streams `jobs` with `streams` threads; returns (output tokens, this process's CPU s)."""
    url, jobs, streams = args
    from textgen_client import TextgenClient

    def run(job):
        n_in, n_out = job
        client = TextgenClient(url)
        try:
            prompt = synthetic_prompt(n_in)
            last = None
            for last in client.stream(prompt, max_tokens=n_out, ignore_eos=True):
                pass
            return last.num_output_tokens
        finally:
            client.close()

    with futures.ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(run, jobs))
    return tokens, time.process_time()


def steps_table(label: str, wall: float, steps: dict) -> list[list]:
    """Rows: per method, steps, mean batch, seconds in steps and in forward; then idle."""
    rows, busy = [], 0.0
    for method, (count, total, forward, seqs) in sorted(steps.items()):
        busy += total
        rows.append([label, method, int(count), seqs / max(count, 1), total, forward,
                     1e3 * total / max(count, 1)])
    rows.append([label, "engine idle (no step running)", "", "", wall - busy, "", ""])
    return rows


def through_tritonserver(model_dir: Path, requests, clients: int, streams: int) -> dict:
    from server import TritonServer

    write_synthetic_tokenizer(model_dir, LLAMA3_8B["vocab_size"])
    server = TritonServer(engine_config(model_dir), Path(tempfile.mkdtemp()), startup_timeout=600)
    try:
        shards = [(server.grpc_url, requests[i::clients], streams) for i in range(clients)]
        _client_worker((server.grpc_url, [(16, 8)] * 4, 4))  # warm-up
        before = engine_steps(read_metrics(server.metrics_url))
        with multiprocessing.get_context("spawn").Pool(clients) as pool:
            pool.map(_started, range(clients), chunksize=1)  # workers up: imports not timed
            started = time.perf_counter()
            results = pool.map(_client_worker, shards)
            seconds = time.perf_counter() - started
        time.sleep(2)  # metrics are published from their own thread
        after = engine_steps(read_metrics(server.metrics_url))
    finally:
        server.stop()
    steps = {m: [a - b for a, b in zip(v, before.get(m, [0.0] * 4))] for m, v in after.items()}
    return {"seconds": seconds, "tokens": sum(r[0] for r in results),
            "client_cpu": sum(r[1] for r in results), "steps": steps}


def hf_subset(requests, batch: int, cap: int) -> dict:
    model = hf_llama3_8b()
    subset = requests[:batch]
    longest = max(n for n, _ in subset)
    ids = torch.randint(1, 128000, (batch, longest), device="cuda")
    mask = torch.zeros_like(ids)
    for row, (n, _) in enumerate(subset):
        mask[row, longest - n:] = 1  # left padding
    new = min(cap, max(o for _, o in subset))
    with Timer() as t:
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    useful = sum(min(o, new) for _, o in subset)
    del model
    release_gpu_memory()
    return {"seconds": t.seconds, "tokens": useful, "batch": batch, "steps": new}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="client processes")
    parser.add_argument("--streams", type=int, default=48, help="concurrent streams per process")
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--hf-cap", type=int, default=256, help="HF output tokens per request")
    parser.add_argument("--skip", default="",
                        help="comma list of: engine,triton,hf,sync (the in-process run with "
                             "--no-async-scheduling)")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    requests = sharegpt_workload(args.requests, max_len=MAX_LEN)
    n_in = sum(i for i, _ in requests) / len(requests)
    n_out = sum(o for _, o in requests) / len(requests)
    ceilings = measure_ceilings()
    model_dir = llama3_8b_dir()
    rows = []
    # tritonserver first: its engine lives in another process, gone when the server stops.
    served = None if "triton" in skip else through_tritonserver(model_dir, requests,
                                                               args.clients, args.streams)
    runs = [] if "engine" in skip else in_process(model_dir, requests,
                                                  compare_sync="sync" not in skip)
    engine = runs[0] if runs else None
    for run in runs:
        share = 100 * run["tokens"] / run["seconds"] / (engine["tokens"] / engine["seconds"])
        rows.append(["engine in-process" + ("" if run["async"] else
                                            ", --no-async-scheduling"),
                     args.requests, run["tokens"], run["seconds"],
                     run["tokens"] / run["seconds"], f"{share:.0f}%"])
    if served:
        share = (f"{100 * served['tokens'] / served['seconds'] / (engine['tokens'] / engine['seconds']):.0f}%"
                 if engine else "")
        rows.append([f"tritonserver, {args.clients}x{args.streams} gRPC streams", args.requests,
                     served["tokens"], served["seconds"], served["tokens"] / served["seconds"], share])
    if "hf" not in skip:
        hf = hf_subset(requests, args.hf_batch, args.hf_cap)
        rows.append([f"HF generate, first {hf['batch']} requests in one batch, {hf['steps']} steps",
                     hf["batch"], hf["tokens"], hf["seconds"], hf["tokens"] / hf["seconds"], ""])
    print(f"\nworkload: {args.requests} requests, mean {n_in:.0f} input / {n_out:.0f} output tokens"
          f"; copy {ceilings['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul "
          f"{ceilings['flops'] / 1e12:.0f} TFLOP/s")
    if engine:
        print(f"engine: KV cache {engine['kv_tokens']} tokens, peak GPU memory "
              f"{engine['peak_gib']:.1f} GiB, GPU busy {100 * engine['busy']:.0f}% of wall time "
              f"in steady state")
    print_table("Offline throughput, Llama-3-8B shape, bf16",
                ["path", "requests", "output tokens", "seconds", "output tok/s", "vs in-process"],
                rows)
    breakdown = []
    for run in runs:
        breakdown += steps_table("in-process" + ("" if run["async"] else ", one by one"),
                                 run["seconds"], run["steps"])
    if served:
        breakdown += steps_table("tritonserver", served["seconds"], served["steps"])
        print(f"client processes: {served['client_cpu']:.1f} s of CPU for "
              f"{args.requests} requests ({1e3 * served['client_cpu'] / args.requests:.1f} ms "
              f"each)")
    # "in steps": the engine's step() calls in-process, the server's step durations served;
    # "in forward": launch to tokens read (with async scheduling, the next step's launch within)
    print_table("Where the time goes (engine steps)",
                ["path", "steps", "count", "mean batch", "s in steps", "s in forward",
                 "ms per step"], breakdown)


if __name__ == "__main__":
    main()
