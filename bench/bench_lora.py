"""LoRA serving on Llama-3-8B's shape (bf16, random weights; rank-16 adapters on all seven
projections, random too), one GPU, one run, four tables:

  1. decode ms per step at batch 64: the base model alone, then 1, 8 and 64 distinct adapters
  2. 1,000 ShareGPT-shaped requests in-process: no adapters vs 100 adapters (Zipf-distributed)
  3. loading a rank-16 adapter from local disk, and the decode steps that run during loads
  4. the shrink / expand kernels, per token and per tile, against the bytes they must move
     (measured bandwidth), on decode batches and a prefill

    python bench/bench_lora.py [--rank 16] [--batch 64] [--requests 1000] [--adapters 100]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import (LLAMA3_8B, Timer, decode_step_ms, kv_bytes_per_token, llama3_8b_dir,
                    measure_ceilings, print_table, release_gpu_memory, sharegpt_workload, step)

PROJECTIONS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "mlp": ["gate_proj", "up_proj", "down_proj"]}


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Projection -> (in, out) features."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_bytes(rank: int) -> int:
    """What a decode step must read of one adapter: A and B of every projection, bf16."""
    per_layer = sum(rank * (fan_in + fan_out) for fan_in, fan_out in _shapes(LLAMA3_8B).values())
    return 2 * per_layer * LLAMA3_8B["num_hidden_layers"]


def step_bytes(engine, batch: int, context: int) -> int:
    """What a base decode step must read: the weights (of the embeddings only the batch's
    rows) and the batch's KV (bf16)."""
    weights = sum(p.numel() * p.element_size()
                  for name, p in engine.runner.model.named_parameters()
                  if "embed_tokens" not in name)
    return weights + batch * context * kv_bytes_per_token(LLAMA3_8B)


def write_adapters(root: Path, count: int, rank: int) -> list[Path]:
    """`count` random PEFT LoRA directories of Llama-3-8B's shape (bf16)."""
    from safetensors.torch import save_file

    shapes = _shapes(LLAMA3_8B)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": [p for ps in PROJECTIONS.values() for p in ps]}
    directories = []
    generator = torch.Generator(device="cuda")
    for index in range(count):
        generator.manual_seed(index)
        tensors = {}
        for layer in range(LLAMA3_8B["num_hidden_layers"]):
            for block, names in PROJECTIONS.items():
                for name in names:
                    fan_in, fan_out = shapes[name]
                    prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                    tensors[f"{prefix}.lora_A.weight"] = (torch.randn(
                        rank, fan_in, generator=generator, device="cuda") / fan_in**0.5
                    ).bfloat16().cpu()
                    tensors[f"{prefix}.lora_B.weight"] = (torch.randn(
                        fan_out, rank, generator=generator, device="cuda") / rank**0.5 / 8
                    ).bfloat16().cpu()
        directory = root / f"adapter-{index}"
        directory.mkdir()
        save_file(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps(config))
        directories.append(directory)
    return directories


def build_engine(model_dir: Path, rank: int, num_adapters: int):
    from textgen_backend.adapters.catalog import AdapterCatalog
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine

    config = EngineConfig(model_id=str(model_dir), load_format="dummy", dtype="bfloat16",
                          max_input_tokens=1024, max_total_tokens=2048,
                          max_batch_prefill_tokens=8192, max_concurrent_requests=1024,
                          max_batch_size=512, cuda_graphs="1,2,4,8,16,32,64,128,256,384,512",
                          max_lora_rank=rank, max_active_adapters=num_adapters + 8,
                          adapter_memory_fraction=0.15, adapter_source="local",
                          waiting_served_ratio=0.0)
    engine = Engine(config, model_dir)
    return engine, AdapterCatalog(config, engine.model_config)


def _sequences(first_id, count, lengths, adapters, rng):
    from textgen_backend.engine.sequence import Sequence
    from textgen_backend.sampling.params import SamplingParams, StoppingParams

    return [Sequence(first_id + i, rng.integers(0, 128000, n_in).tolist(), SamplingParams(),
                     StoppingParams(max_tokens=n_out, ignore_eos=True), adapter=adapter)
            for i, ((n_in, n_out), adapter) in enumerate(zip(lengths[:count], adapters))]


def decode_ms(engine, refs: list, batch: int, context: int, steps: int, first_id: int) -> float:
    """ms per decode step of `batch` sequences, row i with refs[i % len(refs)] (None: base).
    The adapters are loaded first: loading them one by one while the batch waited let the rows
    of the first ones finish before the last arrived (the first H100 run timed 2 to 24 rows)."""
    for ref in refs:
        if ref is not None:
            engine.adapters.preload(ref)
    rng = np.random.default_rng(first_id)
    seqs = _sequences(first_id, batch, [(context, steps + 16)] * batch,
                      [refs[i % len(refs)] for i in range(batch)], rng)
    return decode_step_ms(engine, seqs, steps)


def throughput(engine, requests, refs: list, first_id: int) -> tuple[float, float]:
    """(generated tokens per second, seconds) for the workload, request i with refs[i]."""
    seqs = _sequences(first_id, len(requests), requests, refs, np.random.default_rng(1))
    with Timer() as t:
        for seq in seqs:
            engine.add(seq)
        while engine.has_work():
            step(engine)
    return sum(n_out for _, n_out in requests) / t.seconds, t.seconds


def _timed_step(engine) -> float:
    """Seconds of one engine.step() call: a step's time between calls (a step's own
    total_seconds spans its launch to its read, which with async scheduling includes the step
    before it)."""
    started = time.perf_counter()
    step(engine)
    return time.perf_counter() - started


def loading(engine, catalog, directories, batch: int, context: int) -> dict:
    """Load time of 5 adapters read from disk into the last slot (the page cache is not
    dropped), then the decode steps of a running base batch while 8 more load."""
    load_ms = []
    slots = engine.adapters.slots
    for directory in directories[:5]:
        ref = catalog.resolve(str(directory), "local", "")
        with Timer() as t:
            slots.write(slots.num_slots - 1, catalog.load(ref))
            torch.cuda.synchronize()
        load_ms.append(1e3 * t.seconds)
    rng = np.random.default_rng(7)
    base = _sequences(900_000, batch, [(context, 400)] * batch, [None] * batch, rng)
    for seq in base:
        engine.add(seq)
    while any(not s.output_ids for s in base):
        step(engine)
    quiet, during = [], []
    for _ in range(30):
        quiet.append(_timed_step(engine))
    refs = [catalog.resolve(str(d), "local", "") for d in directories[5:13]]
    waiting = _sequences(910_000, len(refs), [(16, 4)] * len(refs), refs, rng)
    for seq in waiting:
        engine.add(seq)
    started = time.perf_counter()
    while any(not s.output_ids for s in waiting):
        seconds = _timed_step(engine)
        if engine.last_step is not None and not engine.last_step.is_prefill:
            during.append((seconds, engine.last_step.batch_size, engine.last_step.num_tokens,
                           engine.adapters.num_active))
    loads_seconds = time.perf_counter() - started
    while engine.has_work():
        step(engine)
    worst = max(during, default=(float("nan"), 0, 0, 0))
    return {"load_ms": load_ms, "quiet_ms": 1e3 * float(np.median(quiet)),
            "worst_ms": 1e3 * worst[0], "worst_step": worst[1:],
            "steps_during": len(during), "loads_seconds": loads_seconds}


def kernels(rank: int, slots: int, batch: int, bandwidth: float) -> list[list]:
    """Each projection's shrink and expand, per token and per tile (lora.TILE_MIN_TOKENS
    decides between them in the server), on a decode batch with 1, 8 and `batch` distinct
    adapters and on a 2,048-token prefill of 8 prompts."""
    import triton.testing

    from textgen_kernels import lora

    shapes = [(batch, distinct, "decode") for distinct in (1, 8, batch)] + [(2048, 8, "prefill")]
    default_threshold, rows = lora.TILE_MIN_TOKENS, []
    projections = {"qkv_proj": (4096, (0, 4096, 5120, 6144)), "o_proj": (4096, (0, 4096)),
                   "gate_up_proj": (4096, (0, 14336, 28672)), "down_proj": (14336, (0, 4096))}
    for name, (k, columns) in projections.items():
        n, starts, shards = columns[-1], columns[:-1], len(columns) - 1
        r = shards * rank
        shared = torch.zeros(slots, dtype=torch.int32, device="cuda")  # per-shard ranks
        a = torch.randn(slots, r, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(slots, n, r, dtype=torch.bfloat16, device="cuda")
        for tokens, distinct, kind in shapes:
            x = torch.randn(tokens, k, dtype=torch.bfloat16, device="cuda")
            out = torch.randn(tokens, n, dtype=torch.bfloat16, device="cuda")
            rows_per_prompt = 1 if kind == "decode" else tokens // distinct
            slot_of = (torch.arange(tokens, device="cuda") // rows_per_prompt % distinct).int()
            times = {}
            for path, threshold in (("per token", 10**9), ("tiles", 1)):
                lora.TILE_MIN_TOKENS = threshold
                h = lora.lora_shrink(x, a, slot_of)
                times[path] = (
                    triton.testing.do_bench(lambda: lora.lora_shrink(x, a, slot_of, out=h),
                                            return_mode="median"),
                    triton.testing.do_bench(
                        lambda: lora.lora_expand(out, h, b, slot_of, starts, shared),
                        return_mode="median"))
            lora.TILE_MIN_TOKENS = default_threshold
            # what must move: each distinct adapter's A (B: its shard's ranks), x and out
            shrink_bytes = 2 * (distinct * r * k + tokens * k)
            expand_bytes = 2 * (distinct * n * rank + 2 * tokens * n)
            shrink_ms = min(t[0] for t in times.values())
            expand_ms = min(t[1] for t in times.values())
            rows.append([name, kind, tokens, distinct,
                         " / ".join(f"{1e3 * t[0]:.1f}" for t in times.values()),
                         f"{100 * shrink_bytes / (shrink_ms / 1e3) / bandwidth:.0f}%",
                         " / ".join(f"{1e3 * t[1]:.1f}" for t in times.values()),
                         f"{100 * expand_bytes / (expand_ms / 1e3) / bandwidth:.0f}%"])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--zipf", type=float, default=1.1)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"commit {commit or 'unknown'}; {torch.cuda.get_device_name()}")
    started = time.perf_counter()

    def phase(name):
        print(f"[{time.perf_counter() - started:6.1f}s] {name}", flush=True)
    ceilings = measure_ceilings()
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    count = max(args.adapters, 64)
    directories = write_adapters(root, count + 13, args.rank)  # 13 never served before loads
    phase(f"{count + 13} adapters written")
    engine, catalog = build_engine(llama3_8b_dir(), args.rank, count)
    phase("engine built")
    refs = [catalog.resolve(str(d), "local", "") for d in directories[:count]]

    # loads first: every slot is free, so the direct write below touches no served adapter
    loads = loading(engine, catalog, directories[count:], args.batch, args.context)
    phase("loads measured")
    decode_rows, base_ms = [], None
    base_bytes, adapter_bytes = step_bytes(engine, args.batch, args.context), lora_bytes(args.rank)
    for distinct in (0, 1, 8, 64):
        chosen = refs[:distinct] or [None]
        ms = decode_ms(engine, chosen, args.batch, args.context, args.steps, 100_000 * distinct)
        phase(f"decode with {distinct} adapters")
        base_ms = base_ms or ms
        decode_rows.append(["base model" if not distinct else f"{distinct} adapters",
                            f"{ms:.2f}", f"{1e3 * args.batch / ms:,.0f}",
                            f"{100 * base_ms / ms:.0f}%",
                            f"{100 * base_bytes / (base_bytes + distinct * adapter_bytes):.0f}%"])
    print_table(f"Decode, batch {args.batch}, context {args.context}, rank {args.rank} on all "
                f"seven projections (roofline: a step reads the weights and KV, "
                f"{base_bytes / 1e9:.1f} GB, plus {adapter_bytes / 1e6:.0f} MB per distinct "
                "adapter)", ["rows use", "ms/step", "tok/s", "of base", "roofline of base"],
                decode_rows)

    requests = sharegpt_workload(args.requests)
    zipf = 1.0 / np.arange(1, args.adapters + 1) ** args.zipf
    picks = np.random.default_rng(3).choice(args.adapters, args.requests, p=zipf / zipf.sum())
    base_tps, base_s = throughput(engine, requests, [None] * len(requests), 1_000_000)
    lora_tps, lora_s = throughput(engine, requests, [refs[i] for i in picks], 2_000_000)
    print_table(f"{args.requests} ShareGPT-shaped requests in-process",
                ["requests use", "seconds", "output tok/s", "of base"],
                [["base model", f"{base_s:.1f}", f"{base_tps:,.0f}", "100%"],
                 [f"{args.adapters} adapters (Zipf {args.zipf})", f"{lora_s:.1f}",
                  f"{lora_tps:,.0f}", f"{100 * lora_tps / base_tps:.0f}%"]])
    print_table("Adapter loads", ["measure", "value"],
                [["load from disk into a slot, ms (5 adapters)",
                  ", ".join(f"{ms:.0f}" for ms in loads["load_ms"])],
                 ["decode step without a load, median ms", f"{loads['quiet_ms']:.2f}"],
                 [f"slowest of {loads['steps_during']} decode steps during 8 loads, ms",
                  f"{loads['worst_ms']:.2f} ({loads['worst_ms'] / loads['quiet_ms']:.2f}x)"],
                 ["  that step: sequences, tokens, adapters resident",
                  ", ".join(str(v) for v in loads["worst_step"])],
                 ["8 loads, s from the first request to every first token",
                  f"{loads['loads_seconds']:.2f}"]])
    slots = engine.adapters.slots.num_slots
    del engine
    release_gpu_memory()
    print_table(f"Kernels, batch {args.batch} ({slots} slots; % of "
                f"{ceilings['bandwidth'] / 1e12:.2f} TB/s measured)",
                ["projection", "step", "tokens", "distinct adapters",
                 "shrink us, per token / tiles", "of bandwidth (faster)",
                 "expand us, per token / tiles", "of bandwidth (faster)"],
                kernels(args.rank, slots, args.batch, ceilings["bandwidth"]))


if __name__ == "__main__":
    main()
