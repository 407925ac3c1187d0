"""int4 (GPTQ layout, 4 bits, groups of 128) against our bf16 path on the Llama-3-8B shape, one
GPU, one run: kernel bandwidth of the four projections at batch 1, a sweep of kernel configs
per batch size (the winners drive the int4 engine below), and decode ms/step of bf16 and of
each --quantize value asked for (the on-the-fly schemes quantize random bf16 weights).

    python bench/bench_quant.py [--batches 1,8,32,64] [--context 1024] [--steps 32] [--no-tune]
                                [--quantize gptq,eetq,fp8,bitsandbytes-nf4]

Random weights: the int4 engine draws packed words on the device (--load-format dummy with
--quantize gptq); no checkpoint is read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
import traceback

import torch
import triton
import triton.testing

from common import (LLAMA3_8B, Timer, decode_headroom, kv_bytes_per_token, llama3_8b_dir,
                    measure_ceilings, print_table, release_gpu_memory, time_decode)
from textgen_kernels import quant_matmul as qm

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672),
          "down_proj": (14336, 4096)}  # (K, N)
GROUP = 128
CALLS = 24          # kernel calls per timed CUDA graph
ROTATE_BYTES = 150e6  # distinct weights per graph: 3 x the H100's 50 MB L2
C = qm.QuantMatmulConfig
# Candidates per batch bucket: (kernel, block_m, block_n, block_k, num_warps, num_stages), each
# tried with every split-K "waves" of its bucket (0: no split).
CANDIDATES = {
    1: [("gemv", 1, 256, 64, 2, 1), ("gemv", 1, 512, 64, 4, 1), ("gemv", 1, 256, 128, 2, 1),
        ("gemv", 1, 128, 64, 1, 1)],
    8: [("gemv", 8, 256, 16, 2, 1), ("tiled", 16, 128, 128, 4, 3),
        ("tiled_t", 16, 128, 128, 4, 3), ("tiled_t", 16, 64, 128, 4, 3)],
    32: [("tiled", 32, 128, 64, 4, 3), ("tiled", 32, 64, 128, 4, 3),
         ("tiled_t", 32, 128, 64, 4, 3), ("tiled_t", 32, 64, 128, 4, 3),
         ("tiled_t", 32, 256, 64, 8, 3)],
    64: [("tiled", 64, 128, 64, 4, 3), ("tiled", 64, 64, 128, 4, 3),
         ("tiled_t", 64, 128, 64, 4, 3), ("tiled_t", 64, 64, 128, 4, 3)],
}
WAVES = {1: (2, 4, 8), 8: (1, 2, 4), 32: (1, 2), 64: (0, 1, 2)}


def packed_bytes(k: int, n: int) -> int:
    """int4 words + float16 scales and zeros."""
    return k * n // 2 + 2 * 2 * math.ceil(k / GROUP) * n


def quantized_weights(k: int, n: int, copies: int) -> list[dict]:
    out = []
    for _ in range(copies):
        out.append(dict(
            qweight=torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
            scales=((torch.rand(k // GROUP, n, device="cuda") + 0.5) / 200).half(),
            zeros=torch.randint(0, 16, (k // GROUP, n), device="cuda").half(),
            group_size=GROUP, bits=4))
    return out


def graph_ms(calls) -> float:
    """Median ms per call of CALLS back-to-back calls captured in one CUDA graph (cold L2 at
    each replay; the calls rotate over weights that L2 cannot hold)."""
    for fn in calls:  # compile / warm up outside capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            calls[i % len(calls)]()
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=30, return_mode="median")
    del graph
    return ms / CALLS


def copies_for(nbytes: int) -> int:
    return max(1, min(CALLS, math.ceil(ROTATE_BYTES / nbytes)))


def check_config(x, w, cfg) -> bool:
    ref = qm.quant_matmul_reference(x.float(), **w)
    out = qm.quant_matmul(x, **w, config=cfg)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return math.isfinite(err) and err < 1e-2


def kernel_table(ceilings: dict) -> None:
    """Batch 1: the int4 GEMV (launcher's choice, after tuning) vs bf16 F.linear (cuBLAS)."""
    rows = []
    for name, (k, n) in SHAPES.items():
        nbytes = packed_bytes(k, n) + 2 * (k + n)
        ws = quantized_weights(k, n, copies_for(nbytes))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        int4_ms = graph_ms([lambda w=w: qm.quant_matmul(x, **w) for w in ws])
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                 for _ in range(copies_for(2 * k * n))]
        bf16_ms = graph_ms([lambda d=d: torch.nn.functional.linear(x, d) for d in dense])
        gbs = nbytes / (int4_ms * 1e6)
        cfg = qm.choose_config(1)
        rows.append([name, f"{k} x {n}", f"{int4_ms * 1e3:.1f}", f"{gbs:,.0f}",
                     f"{100 * gbs * 1e9 / ceilings['bandwidth']:.0f}%", f"{bf16_ms * 1e3:.1f}",
                     f"{2 * k * n / (bf16_ms * 1e6):,.0f}", f"{bf16_ms / int4_ms:.2f}x",
                     f"{cfg.kernel} {cfg.block_n}/{cfg.block_k}/w{cfg.num_warps}/"
                     f"waves {cfg.waves}"])
        del ws, dense
        release_gpu_memory()
    print_table("Projections at batch 1 (CUDA-graph replays, cold L2): int4 GEMV vs bf16 cuBLAS",
                ["shape", "K x N", "int4 us", "int4 GB/s", "% of copy BW", "bf16 us",
                 "bf16 GB/s", "int4 speedup", "config BN/BK/warps/waves"], rows)


def tune(batches, budget_s: float, save: str | None) -> None:
    """Times every candidate config at every (batch, shape); per batch bucket the config with
    the least total time over the four shapes (if it beats default_config) goes into
    quant_matmul.CONFIG_BY_BUCKET, which the int4 engine below uses, and into `save` (JSON,
    for TEXTGEN_QUANT_CONFIGS). Past budget_s the remaining buckets keep their defaults."""
    rows, chosen = [], {}
    started = time.monotonic()
    for m in batches:
        bucket = qm.m_bucket(m)
        if time.monotonic() - started > budget_s:
            print(f"[tune] over budget: batch {m} keeps the default config")
            continue
        totals: dict = {}  # config -> {shape: ms}
        defaults = {}
        for name, (k, n) in SHAPES.items():
            ws = quantized_weights(k, n, copies_for(packed_bytes(k, n)))
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for kernel, *blocks in CANDIDATES.get(bucket, []):
                try:
                    if not check_config(x, ws[0], C(kernel, *blocks, waves=1)):
                        print(f"[tune] wrong result: M={m} {name} {kernel} {blocks}")
                        continue
                    for waves in WAVES[bucket]:
                        cfg = C(kernel, *blocks, waves=waves, split_k=1 if waves == 0 else None)
                        totals.setdefault(cfg, {})[name] = graph_ms(
                            [lambda w=w, c=cfg: qm.quant_matmul(x, **w, config=c) for w in ws])
                except Exception:  # a config that does not compile or fit: report, go on
                    print(f"[tune] M={m} {name} {kernel} {blocks} failed:\n"
                          + traceback.format_exc(limit=2))
            defaults[name] = graph_ms([lambda w=w: qm.quant_matmul(x, **w, config=qm.default_config(m))
                                       for w in ws])
            del ws
            release_gpu_memory()
        complete = {cfg: t for cfg, t in totals.items() if len(t) == len(SHAPES)}
        if not complete:
            continue
        best = min(complete, key=lambda cfg: sum(complete[cfg].values()))
        if sum(complete[best].values()) < sum(defaults.values()):
            qm.CONFIG_BY_BUCKET[bucket] = chosen[bucket] = best
        for name, (k, n) in SHAPES.items():
            per_shape = min(totals, key=lambda cfg: totals[cfg].get(name, float("inf")))
            rows.append([m, name, f"{defaults[name] * 1e3:.1f}",
                         f"{complete[best][name] * 1e3:.1f}",
                         f"{packed_bytes(k, n) / (complete[best][name] * 1e6):,.0f}",
                         f"{totals[per_shape][name] * 1e3:.1f} ({per_shape.kernel} "
                         f"{per_shape.block_m}/{per_shape.block_n}/{per_shape.block_k}/"
                         f"w{per_shape.num_warps}/waves {per_shape.waves})"])
        print(f"[tune] batch {m}: {best} ({sum(complete[best].values()) * 1e3:.1f} us over the "
              f"four shapes; default {sum(defaults.values()) * 1e3:.1f} us)", flush=True)
    print_table("Config sweep, us per call (the bucket's best config; the best of any config "
                "for this shape alone)",
                ["batch", "shape", "default us", "chosen us", "chosen GB/s", "best for shape"],
                rows)
    if save:
        with open(save, "w") as f:
            json.dump({str(b): dataclasses.asdict(c) for b, c in chosen.items()}, f, indent=1)


def engine_decode_ms(quantize, batches, context, steps):
    from textgen_backend.config import EngineConfig
    from textgen_backend.engine.engine import Engine

    max_batch, prefill_tokens = max(batches), max(8192, context)
    total = context + steps + decode_headroom(max_batch, context, prefill_tokens)
    config = EngineConfig(model_id=str(llama3_8b_dir()), load_format="dummy", dtype="bfloat16",
                          quantize=quantize, max_input_tokens=context, max_total_tokens=total,
                          max_batch_prefill_tokens=prefill_tokens,
                          max_batch_total_tokens=max_batch * total, waiting_served_ratio=0.0,
                          cuda_graphs=",".join(str(b) for b in batches))
    with Timer() as load:
        engine = Engine(config, config.model_id)
    weight_bytes = sum(t.numel() * t.element_size()
                       for t in list(engine.runner.model.parameters())
                       + list(engine.runner.model.buffers()))
    rng = random.Random(0)
    results = {}
    for batch in batches:
        results[batch] = time_decode(engine, batch, context, steps, rng)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del engine
    release_gpu_memory()
    torch.cuda.reset_peak_memory_stats()
    print(f"[bench] {quantize or 'bf16'} engine: loaded in {load.seconds:.1f}s, weights "
          f"{weight_bytes / 1e9:.2f} GB, peak GPU memory {peak:.1f} GiB", flush=True)
    return results, weight_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--tune-budget-s", type=float, default=150)
    parser.add_argument("--save-configs", help="write the chosen configs here (JSON)")
    parser.add_argument("--quantize", default="gptq",
                        help="comma-separated --quantize values to time against bf16")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ceilings = measure_ceilings()
    print(f"[bench] {torch.cuda.get_device_name()}: copy {ceilings['bandwidth'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['flops'] / 1e12:.0f} TFLOP/s", flush=True)
    if not args.no_tune:
        tune(batches, args.tune_budget_s, args.save_configs)
    kernel_table(ceilings)
    bf16, bf16_bytes = engine_decode_ms(None, batches, args.context, args.steps)
    schemes = {q: engine_decode_ms(q, batches, args.context, args.steps)
               for q in args.quantize.split(",")}
    embed_bytes = 2 * LLAMA3_8B["vocab_size"] * LLAMA3_8B["hidden_size"]  # read: one row each
    rows = []
    for batch in batches:
        ctx = args.context + args.steps // 2
        kv = batch * ctx * kv_bytes_per_token(LLAMA3_8B)
        b_ms, b_graph = bf16[batch]
        row = [batch, b_ms, b_graph]
        for results, weight_bytes in schemes.values():
            floor = 1e3 * (weight_bytes - embed_bytes + kv) / ceilings["bandwidth"]
            q_ms, _ = results[batch]
            row += [q_ms, f"{b_ms / q_ms:.2f}x", f"{100 * floor / q_ms:.0f}%"]
        rows.append(row)
    headers = ["batch", "bf16 ms/step", "bf16 graph ms"]
    for name in schemes:
        headers += [f"{name} ms/step", f"{name} speedup", f"{name} % of floor"]
    print_table(f"Decode ms/step, Llama-3-8B shape, context {args.context}: bf16 vs "
                f"{', '.join(schemes)} (gptq: int4 g{GROUP}; the others quantized on the fly), "
                f"our engine with CUDA graphs; floor = bytes read / measured copy bandwidth",
                headers, rows)


if __name__ == "__main__":
    main()
