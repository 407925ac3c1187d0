"""Paged attention on the GPU: decode GB/s and prefill TFLOP/s against measured ceilings.

Run from the repo root:  python bench/bench_attention.py [--sweep]
Imports `textgen_kernels` when it is installed, else the same modules from ./kernels (the
package's source directory; each kernel module is self-contained), so `PYTHONPATH=src:.`
setups without an install work too.

One run measures, in this order:
  1. the two ceilings: device copy bandwidth (a large clone; bytes read + written) and bf16
     matmul TFLOP/s (8192^3 on random data);
  2. correctness of both kernels against the float32 reference (aborts on failure);
  3. decode (Llama-3-8B layer: 32 q heads, 8 KV heads, head_dim 128, bf16, block 16) at context
     1k/4k/16k for batch 1 and 64; bytes = K + V of every context read once; timed as CUDA-graph
     replays that rotate over enough block tables to defeat the L2 cache;
  4. prefill, causal, 1 x 2048 and 4 x 1024 tokens, FLOPs = 2 * 2 * T^2 / 2 * H * D per sequence,
     beside torch scaled_dot_product_attention(is_causal=True) on dense tensors of the same shape.
All times are triton.testing.do_bench medians. --sweep adds a table of alternative kernel
configurations (block sizes, warps, stages, splits) for tuning; --asm prints the compiled
kernels' registers, spills, shared memory and PTX instruction counts (wgmma, cp.async, ...).

Measured 2026-11-22 on an H100 80GB HBM3 (132 SMs, torch 2.11, triton 3.6; copy 3.0 TB/s,
bf16 matmul ~690 TFLOP/s): decode batch 1 at 1k/4k/16k 8.4/14.7/33.6 us (17/38/67% of copy;
two launches and ~6 dependent memory round trips put a ~7 us floor under it), batch 64
84/93/98%; prefill 1 x 2048 269 TFLOP/s, 4 x 1024 247 TFLOP/s, against SDPA's 399 and 390
(1.5x its time). Decode uses mma.sync + cp.async, prefill wgmma + cp.async (--asm).
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

try:
    from textgen_kernels import paged_attention as pa
except ImportError:  # not installed: src/ holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from textgen_kernels import paged_attention as pa

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
L2_DEFEAT_BYTES = 512 << 20  # rotate block tables until one graph replay touches this much


def measure_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), both on random data."""
    x = torch.randn(1 << 29, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * x.numel() * x.element_size() / ms / 1e6
    del x, y
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return copy_gbs, 2 * n**3 / ms / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def paged_cache(total_blocks: int):
    k_cache = torch.randn(total_blocks, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    return k_cache, torch.randn_like(k_cache)


def check_correctness() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ctx_lens = [0, 1, 17, 1000, 4096, 3333]
    width = 4096 // PAGE
    k_cache, v_cache = paged_cache(len(ctx_lens) * width)
    table = torch.randperm(len(ctx_lens) * width, device="cuda", generator=gen)
    table = table.view(len(ctx_lens), width).int()
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(ctx_lens), Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    up = [t.float() for t in (q, k_cache, v_cache)]
    out = pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, HEAD_DIM**-0.5)
    ref = pa.paged_attention_decode_reference(*up, ctx, table, HEAD_DIM**-0.5)
    live = ctx > 0
    decode_err = rel_err(out[live], ref[live])
    zero_ok = bool((out[~live] == 0).all())

    q_lens = [1024, 1, 300, 700]
    prefill_ctx = [1024, 900, 4096, 700]
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    ctx = torch.tensor(prefill_ctx, dtype=torch.int32, device="cuda")
    out = pa.paged_attention(q, k_cache, v_cache, cu, ctx, table[:4], max(q_lens), HEAD_DIM**-0.5)
    up = [t.float() for t in (q, k_cache, v_cache)]
    ref = pa.paged_attention_reference(*up, cu, ctx, table[:4], max(q_lens), HEAD_DIM**-0.5)
    prefill_err = rel_err(out, ref)
    print(f"correctness (bf16 vs float32 reference): decode rel err {decode_err:.2e}, "
          f"context_len 0 rows zero: {zero_ok}; prefill rel err {prefill_err:.2e}")
    if not (decode_err < 1e-2 and prefill_err < 1e-2 and zero_ok):
        sys.exit("correctness check failed: not timing a wrong kernel")


def decode_case(batch: int, ctx_len: int, config=None) -> tuple[float, float]:
    """(microseconds per call, GB/s) for one decode step, from CUDA-graph replays."""
    blocks_per_seq = ctx_len // PAGE
    bytes_per_call = 2 * batch * ctx_len * KV_HEADS * HEAD_DIM * 2  # K and V, bf16
    rotations = max(1, min(32, triton.cdiv(L2_DEFEAT_BYTES, bytes_per_call)))
    k_cache, v_cache = paged_cache(rotations * batch * blocks_per_seq)
    perm = torch.randperm(rotations * batch * blocks_per_seq, device="cuda").int()
    tables = perm.view(rotations, batch, blocks_per_seq)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    ctx = torch.full((batch,), ctx_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def step(table):
        if config is None:
            pa.paged_attention_decode(q, k_cache, v_cache, ctx, table, HEAD_DIM**-0.5, out=out)
        else:
            pa._launch_decode(q, k_cache, v_cache, ctx, table, HEAD_DIM**-0.5, None, out, *config)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for table in tables:
            step(table)  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for table in tables:
            step(table)
    ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / rotations
    del graph, k_cache, v_cache
    return ms * 1e3, bytes_per_call / ms / 1e6


def prefill_inputs(batch: int, seq_len: int):
    blocks_per_seq = seq_len // PAGE
    k_cache, v_cache = paged_cache(batch * blocks_per_seq)
    table = torch.randperm(batch * blocks_per_seq, device="cuda").int().view(batch, blocks_per_seq)
    q = torch.randn(batch * seq_len, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device="cuda")
    ctx = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, cu, ctx, table


def prefill_case(batch: int, seq_len: int, config=None) -> float:
    """Milliseconds per call of the paged prefill kernel."""
    q, k_cache, v_cache, cu, ctx, table = prefill_inputs(batch, seq_len)
    out = torch.empty_like(q)
    if config is None:
        fn = lambda: pa.paged_attention(q, k_cache, v_cache, cu, ctx, table, seq_len,  # noqa: E731
                                        HEAD_DIM**-0.5, out=out)
    else:
        fn = lambda: pa._launch_prefill(q, k_cache, v_cache, cu, ctx, table, seq_len,  # noqa: E731
                                        HEAD_DIM**-0.5, None, out, *config)
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def sdpa_case(batch: int, seq_len: int) -> float:
    """Milliseconds per call of torch SDPA (is_causal) on dense [B, H, T, D] tensors."""
    q = torch.randn(batch, Q_HEADS, seq_len, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, enable_gqa=True)
    except (RuntimeError, TypeError):  # no GQA in this torch: expand K/V (not timed)
        k, v = (t.repeat_interleave(Q_HEADS // KV_HEADS, dim=1) for t in (k, v))
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def causal_flops(batch: int, seq_len: int) -> float:
    return batch * 2 * 2 * seq_len**2 / 2 * Q_HEADS * HEAD_DIM


def sweep(copy_gbs: float, matmul_tflops: float) -> None:
    print("\nsweep: decode (BLOCK_N, splits, warps, stages)")
    print(f"{'batch':>5} {'ctx':>6} {'config':>18} {'us':>8} {'GB/s':>7} {'%copy':>6}")
    for batch, ctx_len in [(1, 1024), (1, 16384), (64, 4096)]:
        default = pa._decode_config(batch, KV_HEADS, ctx_len // PAGE, PAGE, HEAD_DIM, DTYPE,
                                    torch.device("cuda"))
        splits = sorted({default[1], min(128, default[1] * 2)})
        for block_n, num_splits, warps, stages in itertools.product(
                (32, 64, 128), splits, (4, 8), (2, 4)):
            config = (block_n, num_splits, warps, stages)
            try:
                us, gbs = decode_case(batch, ctx_len, config)
            except Exception as exc:  # e.g. out of shared memory
                print(f"{batch:>5} {ctx_len:>6} {str(config):>18} failed: {type(exc).__name__}")
                continue
            mark = " <- default" if config == default else ""
            print(f"{batch:>5} {ctx_len:>6} {str(config):>18} {us:8.1f} {gbs:7.0f} "
                  f"{100 * gbs / copy_gbs:5.1f}%{mark}")
    print("\nsweep: prefill (BLOCK_M, BLOCK_N, warps, stages)")
    print(f"{'shape':>9} {'config':>18} {'ms':>8} {'TFLOP/s':>8} {'%mm':>6}")
    for batch, seq_len in [(1, 2048), (4, 1024)]:
        default = pa._prefill_config(seq_len, HEAD_DIM, DTYPE, torch.device("cuda"))
        for config in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            try:
                ms = prefill_case(batch, seq_len, config)
            except Exception as exc:
                print(f"{batch}x{seq_len:<7} {str(config):>18} failed: {type(exc).__name__}")
                continue
            tflops = causal_flops(batch, seq_len) / ms / 1e9
            mark = " <- default" if config == default else ""
            print(f"{batch}x{seq_len:<7} {str(config):>18} {ms:8.3f} {tflops:8.1f} "
                  f"{100 * tflops / matmul_tflops:5.1f}%{mark}")


def print_compiled(fn) -> None:
    """Resources and telling PTX instructions of every compiled variant of a Triton kernel."""
    caches = getattr(fn, "device_caches", {})
    for entry in caches.values():
        for compiled in entry[0].values():
            ptx = compiled.asm.get("ptx", "")
            counts = {op: ptx.count(op) for op in ("wgmma.mma_async", "mma.sync", "cp.async",
                                                   "ld.global.v4", "ld.global.L1", "ex2.approx")}
            print(f"  {fn.__name__}: regs {compiled.n_regs}, spills {compiled.n_spills}, "
                  f"shared {compiled.metadata.shared} B, warps {compiled.metadata.num_warps}, "
                  f"stages {compiled.metadata.num_stages}; PTX {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative configs")
    parser.add_argument("--asm", action="store_true", help="print the compiled kernels' resources")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}; shapes: {Q_HEADS} q heads, {KV_HEADS} kv heads, "
          f"head_dim {HEAD_DIM}, {DTYPE}, block {PAGE}")
    copy_gbs, matmul_tflops = measure_ceilings()
    print(f"ceilings: copy {copy_gbs:.0f} GB/s (read + write), "
          f"bf16 matmul {matmul_tflops:.0f} TFLOP/s")
    check_correctness()

    rows = []
    for batch, ctx_len in itertools.product((1, 64), (1024, 4096, 16384)):
        us, gbs = decode_case(batch, ctx_len)
        splits = pa._decode_config(batch, KV_HEADS, ctx_len // PAGE, PAGE, HEAD_DIM, DTYPE,
                                   torch.device("cuda"))[1]
        rows.append(("decode", f"{batch} x {ctx_len}", f"{us:.1f} us", f"{gbs:.0f} GB/s",
                     f"{100 * gbs / copy_gbs:.0f}% of copy", f"splits {splits}"))
    for batch, seq_len in ((1, 2048), (4, 1024)):
        ms = prefill_case(batch, seq_len)
        ref_ms = sdpa_case(batch, seq_len)
        flops = causal_flops(batch, seq_len)
        tflops, ref_tflops = flops / ms / 1e9, flops / ref_ms / 1e9
        rows.append(("prefill", f"{batch} x {seq_len}", f"{ms * 1e3:.1f} us",
                     f"{tflops:.0f} TFLOP/s",
                     f"{100 * tflops / matmul_tflops:.0f}% of matmul",
                     f"SDPA {ref_tflops:.0f} TFLOP/s ({ms / ref_ms:.2f}x its time)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells))
    if args.asm:
        print("\ncompiled variants (registers, shared memory, instruction counts in the PTX):")
        for fn in (pa._decode_split_kernel, pa._decode_reduce_kernel, pa._prefill_kernel):
            try:
                print_compiled(fn)
            except Exception as exc:  # the cache layout is Triton-internal
                print(f"  {fn.__name__}: cannot read the compiled cache ({exc!r})")
    if args.sweep:
        sweep(copy_gbs, matmul_tflops)


if __name__ == "__main__":
    main()
