"""Prefix caching and chunked prefill through the engine (in-process), one run, three tables:

  1. shared prefix: requests with one long common system prompt + a short user part, arriving
     at a fixed rate: TTFT p50 / p99 and output tok/s, --prefix-caching on vs off
  2. multi-turn chat: each turn resends the conversation; TTFT per turn and the hit rate
  3. mixed load: streams decoding while long prompts arrive: the streams' inter-token latency
     p99 against their step time without arrivals, chunked prefill on vs off

On the GPU: Llama-3-8B's shape, bf16, random weights (the issue's sizes by default).
--tiny: the test suite's tiny model on the CPU with small sizes (checks the script runs).

    python bench/bench_prefix.py [--tiny]
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import llama3_8b_dir, print_table, release_gpu_memory, step


def make_engine(model_dir: Path, tiny: bool, **overrides):
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine

    sizes = (dict(max_input_tokens=400, max_total_tokens=512, max_batch_total_tokens=8192,
                  max_batch_prefill_tokens=256) if tiny else
             dict(max_input_tokens=8192, max_total_tokens=8192 + 256,
                  max_batch_prefill_tokens=8192, cuda_graphs="1,2,4,8,16,32,64,128,256"))
    if torch.cuda.is_available() and torch.cuda.memory_allocated() > 2**30:
        print(f"warning: {torch.cuda.memory_allocated() / 2**30:.1f} GiB still held by the "
              "previous engine; this one gets a smaller KV cache")
    config = dict(model_id=str(model_dir), max_concurrent_requests=1024,
                  load_format="safetensors" if tiny else "dummy",
                  dtype="float32" if tiny else "bfloat16", **sizes)
    return Engine(EngineConfig(**{**config, **overrides}), model_dir)


def _seq(seq_id, prompt, tokens):
    from textgen_backend.engine.sequence import Sequence
    from textgen_backend.sampling.params import SamplingParams, StoppingParams

    return Sequence(seq_id, prompt, SamplingParams(),
                    StoppingParams(max_tokens=tokens, ignore_eos=True))


def run_arrivals(engine, arrivals: list[tuple[float, object]]) -> dict:
    """Adds each sequence at its arrival time (seconds from start) and steps until all end;
    returns TTFT and inter-token gaps per sequence, and the wall time."""
    pending = sorted(arrivals, key=lambda a: a[0])
    first, gaps, last, added = {}, {}, {}, {}
    start = time.perf_counter()
    seqs = [s for _, s in pending]
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, seq = pending.pop(0)
            engine.add(seq)
            added[seq.seq_id] = start + at
        if not engine.has_work():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        step(engine)
        stamp = time.perf_counter()
        for seq in seqs:
            n = len(seq.output_ids)
            if n and seq.seq_id not in first:
                first[seq.seq_id] = stamp - added[seq.seq_id]
            if n and last.get(seq.seq_id, (0, 0))[0] != n:
                if seq.seq_id in last:
                    gaps.setdefault(seq.seq_id, []).append(stamp - last[seq.seq_id][1])
                last[seq.seq_id] = (n, stamp)
    return {"ttft": first, "gaps": gaps, "seconds": time.perf_counter() - start,
            "tokens": sum(len(s.output_ids) for s in seqs)}


def shared_prefix(model_dir, tiny, args, rng) -> list[list]:
    """TTFT with requests arriving at args.rate, then throughput with all of them queued at
    once (a fixed arrival rate caps tok/s at what arrives), each with caching on and off."""
    system = rng.integers(10, args.vocab, args.system_tokens).tolist()

    def requests(first_id, rate):
        return [(i / rate if rate else 0.0, _seq(first_id + i, system + rng.integers(
            10, args.vocab, int(rng.integers(50, 201) if not tiny else rng.integers(5, 20))
        ).tolist(), args.output)) for i in range(args.requests)]

    rows = []
    for caching in (True, False):
        engine = make_engine(model_dir, tiny, prefix_caching=caching)
        paced = run_arrivals(engine, requests(0, args.rate))
        burst = run_arrivals(engine, requests(args.requests, None))
        ttft = np.array(list(paced["ttft"].values())) * 1e3
        rows.append(["on" if caching else "off", f"{np.percentile(ttft, 50):.1f}",
                     f"{np.percentile(ttft, 99):.1f}",
                     f"{paced['tokens'] / paced['seconds']:,.0f}",
                     f"{burst['tokens'] / burst['seconds']:,.0f}",
                     f"{engine.stats().prefix_cache_hit_tokens:,}"])
        del engine
        release_gpu_memory()
    return rows


def multi_turn(model_dir, tiny, args, rng) -> list[list]:
    engine = make_engine(model_dir, tiny)
    conversation = rng.integers(10, args.vocab, args.system_tokens // 4).tolist()
    rows = []
    for turn in range(args.turns):
        conversation += rng.integers(10, args.vocab, 40 if not tiny else 8).tolist()
        seq = _seq(turn, list(conversation), args.output // 4)
        before = engine.stats()
        result = run_arrivals(engine, [(0.0, seq)])
        after = engine.stats()
        queried = after.prefix_cache_query_tokens - before.prefix_cache_query_tokens
        hits = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
        rows.append([turn + 1, len(conversation), f"{1e3 * result['ttft'][turn]:.1f}",
                     f"{100 * hits / max(queried, 1):.0f}%"])
        conversation += seq.output_ids
    del engine
    release_gpu_memory()
    return rows


def mixed_load(model_dir, tiny, args, rng) -> list[list]:
    """The streams' inter-token gaps with long prompts arriving, per chunk size (None: chunked
    prefill off); a smaller chunk makes each mixed step cheaper and the long prompts' TTFT
    longer."""
    rows = []
    runs = ([(c, True) for c in args.chunks] + [(c, False) for c in args.eager_chunks]
            + [(None, True)])
    for chunk, graphs in runs:
        # without chunks a prefill holds a whole prompt (TGI: max_input_tokens + 50); without
        # graphs mixed steps run eagerly (--prefill-cuda-graphs 0)
        engine = make_engine(model_dir, tiny, chunked_prefill=chunk is not None,
                             max_batch_prefill_tokens=chunk,
                             **({} if graphs else {"prefill_cuda_graphs": "0"}))
        streams = [(0.0, _seq(i, rng.integers(10, args.vocab, 64).tolist(), args.stream_tokens))
                   for i in range(args.streams)]
        quiet = run_arrivals(engine, [
            (0.0, _seq(10_000 + i, rng.integers(10, args.vocab, 64).tolist(), 32))
            for i in range(args.streams)])
        step_ms = 1e3 * np.median([g for gs in quiet["gaps"].values() for g in gs])
        longs = [(args.long_start + i * args.long_every, _seq(20_000 + i, rng.integers(
            10, args.vocab, args.long_tokens).tolist(), 4)) for i in range(args.longs)]
        result = run_arrivals(engine, streams + longs)
        gaps = np.array([g for sid, gs in result["gaps"].items() if sid < 10_000
                         for g in gs]) * 1e3
        long_ttft = [1e3 * t for sid, t in result["ttft"].items() if sid >= 20_000]
        rows.append([f"{chunk or 'off'}{'' if graphs else ' (eager)'}", f"{step_ms:.2f}", f"{np.percentile(gaps, 50):.2f}",
                     f"{np.percentile(gaps, 99):.2f}", f"{np.percentile(gaps, 99) / step_ms:.2f}x",
                     f"{gaps.max():.1f}", f"{np.mean(long_ttft):.0f}"])
        del engine
        release_gpu_memory()
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=512)
    parser.add_argument("--longs", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--long-every", type=float, default=1.0)
    parser.add_argument("--long-start", type=float, default=1.0,
                        help="seconds before the first long prompt (the streams are running)")
    parser.add_argument("--chunks", type=lambda v: [int(c) for c in v.split(",")],
                        default=[2048, 512, 256], help="chunk sizes (max_batch_prefill_tokens)")
    parser.add_argument("--eager-chunks", type=lambda v: [int(c) for c in v.split(",") if c],
                        default=[], help="chunk sizes also run without prefill / mixed graphs")
    parser.add_argument("--scenarios", default="shared,turns,mixed")
    parser.add_argument("--vocab", type=int, default=100_000, help="random token ids below")
    args = parser.parse_args()
    if args.tiny:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import build_tiny_model

        model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama")
        args.requests, args.system_tokens, args.output, args.rate = 12, 120, 8, 200.0
        args.streams, args.stream_tokens, args.longs, args.long_tokens = 4, 150, 3, 300
        args.chunks, args.long_every, args.turns, args.vocab = [64], 0.05, 3, 390
        args.long_start = 0.02   # while the streams run (150 steps of a few ms)
    else:
        model_dir = llama3_8b_dir(max_position_embeddings=16384)  # 8k prompts + outputs
    rng = np.random.default_rng(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit or 'unknown'}")
    scenarios = args.scenarios.split(",")
    if "shared" in scenarios:
        print_table(f"Shared prefix: {args.requests} requests at {args.rate}/s (then all queued), "
                    f"{args.system_tokens}-token system prompt, {args.output} output tokens",
                    ["prefix caching", "TTFT p50 ms", "TTFT p99 ms", "tok/s paced",
                     "tok/s all queued", "hit tokens"],
                    shared_prefix(model_dir, args.tiny, args, rng))
    if "turns" in scenarios:
        print_table("Multi-turn chat (each turn resends the conversation)",
                    ["turn", "prompt tokens", "TTFT ms", "hit rate"],
                    multi_turn(model_dir, args.tiny, args, rng))
    if "mixed" in scenarios:
        print_table(f"Mixed load: {args.streams} streams decoding, {args.long_tokens}-token "
                    f"prompts every {args.long_every}s",
                    ["chunk (prefill tokens per step)", "step ms (quiet)", "ITL p50 ms",
                     "ITL p99 ms", "p99 / step", "max gap ms", "long prompt TTFT ms"],
                    mixed_load(model_dir, args.tiny, args, rng))


if __name__ == "__main__":
    main()
