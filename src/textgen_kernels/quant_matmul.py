"""Fused dequantize + matmul for 4-bit (and 8-bit) GPTQ / AWQ weights, in one internal layout.

Layout (`textgen_backend.weights.quantization` converts GPTQ and AWQ checkpoints into it):
  qweight [K // PACK, N] int32: PACK = 32 // BITS values of column n per word; weight row
          k = r * PACK + i sits in word row r at bits [BITS * i, BITS * (i + 1)) (GPTQ's order).
  scales  [G, N] float16 / bfloat16 / float32 and zeros [G, N] float16 (integer zero points):
          w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n] with g = k // group_size.
  perm    [K] int32 or None (act-order): weight row k multiplies input feature perm[k]; the
          rows are stored sorted by group so that every group is contiguous.
quant_matmul(x, ...) = x @ W with W[perm[k]] = w[k]: x [M, K] -> [M, N] in x's dtype.

Three kernels, chosen per batch size (M) by QuantMatmulConfig: a GEMV on CUDA cores for the
smallest M (decode is memory-bound: each value costs one LOP3, one FADD and one FFMA), a tiled
tensor-core kernel (dequantized [BK, BN] weight tiles into tl.dot; prefill), and its transpose
for small M (the weight tile as the MMA's wide operand, the batch as the narrow one). All three
split over K when their output tiles alone cannot fill the GPU (the last split of a tile to
finish sums the partials).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def dequantize_reference(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, bits: int, perm: torch.Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight as a dense [N, K] matrix in input-feature order (nn.Linear's layout):
    computed in float32, then cast to dtype."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=qweight.device, dtype=torch.int64) * bits
    q = (qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    q = q.reshape(qweight.shape[0] * pack, -1).float()  # [K, N], row k = r * pack + i
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    w = (q - zeros.float()[groups]) * scales.float()[groups]
    if perm is not None:
        w = torch.empty_like(w).index_copy_(0, perm.long(), w)  # W[perm[k]] = w[k]
    return w.t().contiguous().to(dtype)


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor, group_size: int, bits: int,
                           perm: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N]: F.linear with the dequantized weight (the engine's CPU path; in
    float32 it is bit-identical to transformers running the dequantized weights)."""
    w = dequantize_reference(qweight, scales, zeros, group_size, bits, perm, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

# Interpreted (CPU) runs: the interpreter's tl.dot multiplies raw bf16 bit patterns, so bf16
# tiles are upcast to float32 before the dot there (UPCAST), after rounding the weights to bf16.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# OR-ing an integer v < 2**23 into the mantissa of 2.0**23 (bits 0x4B000000) gives the float
# 2**23 + v exactly: a conversion without the I2F instruction (a quarter of FFMA's rate).


@triton.jit
def _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr, lock_ptr,
                split, num_splits, tile, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                REDUCE_CHUNK: tl.constexpr):
    """Writes one [BLOCK_M, BLOCK_N] float32 tile of x @ W (+ bias) in the output dtype.

    Split over K: each split stores its partial sum in part_ptr [num_splits, M, N]; the last
    split of the tile to arrive (counted in lock_ptr[tile]) adds the partials in split order
    (deterministic), REDUCE_CHUNK splits per load so that their latencies overlap, writes the
    output and zeroes the counter for the next launch: no memset, and CUDA graphs replay it.
    """
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:
        part = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + split * M * N + part, acc, mask=mask)
        tl.debug_barrier()  # all of this program's partial is stored before it is counted
        arrived = tl.atomic_add(lock_ptr + tile, 1)  # acq_rel, GPU scope
        last = arrived == num_splits - 1
        if last:
            acc = tl.zeros_like(acc)
            chunk = tl.arange(0, REDUCE_CHUNK)
            for s0 in range(0, num_splits, REDUCE_CHUNK):
                s = s0 + chunk
                parts = tl.load(part_ptr + (s * M * N)[:, None, None] + part[None, :, :],
                                mask=(s < num_splits)[:, None, None] & mask[None, :, :],
                                other=0.0, cache_modifier=".cg")  # from L2: other SMs wrote it
                acc += tl.sum(parts, axis=0)
            tl.store(lock_ptr + tile, 0)
        mask = mask & last
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "tiles_per_split", "num_splits"])
def _gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, num_splits,
    value_mask,  # 2**BITS - 1, passed at run time so that it sits in a register (see below)
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    REDUCE_CHUNK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One (column block, K split, row block): BLOCK_M <= 8 rows of x against BLOCK_N columns
    over the split's K range, with CUDA-core FMAs (no tensor cores: decode is memory-bound).

    BLOCK_K divides group_size, so one tile of BLOCK_K rows has one scale and zero per column:
    the tile sums x * (q - zero) and scales once. Value i of a word is masked in place, not
    shifted: its field OR 2**23 is 2**23 + q * 2**S (S = BITS * (i % HALF) < 16; the upper half
    of the word is shifted down once), so subtracting 2**23 + zero * 2**S leaves
    (q - zero) * 2**S exactly and x is pre-scaled by 2**-S: one LOP3, one FADD, one FFMA.
    (A LOP3 takes one immediate: with the field mask in a register, the AND and the OR of the
    2**23 bits fuse.) EVEN_K: BLOCK_K divides K, no K masks (the x loads become plain
    base + immediate loads).
    """
    PACK: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PACK // 2
    ROWS: tl.constexpr = BLOCK_K // PACK
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    # Everything is 3-D [BLOCK_M, ROWS, BLOCK_N] (size 1 where broadcast): the layout of the
    # weight load (16-byte vectors along N) then serves every op, with no layout conversion,
    # and the sum over ROWS stays inside each thread.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None, None]
    offs_r = tl.arange(0, ROWS)[None, :, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, None, :]
    m_mask = offs_m < M
    n_mask = offs_n < N
    # addresses as a scalar base per tile plus loop-invariant offsets (immediates for x)
    w_offs = offs_r * N + offs_n
    x_offs = (offs_m - pid_m * BLOCK_M) * stride_xm
    x_rows = x_ptr + pid_m * BLOCK_M * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * tiles_per_split * BLOCK_K  # a known multiple of BLOCK_K: aligned loads
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w_tile = qweight_ptr + (k0 // PACK) * N
        if EVEN_K:
            words = tl.load(w_tile + w_offs, mask=n_mask, other=0)  # [1, ROWS, BLOCK_N]
        else:
            words = tl.load(w_tile + w_offs, mask=(k0 // PACK + offs_r < K // PACK) & n_mask,
                            other=0)
        high = words >> 16
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        part = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(PACK):
            if i < HALF:
                field = words & (value_mask << (BITS * i))
            else:
                field = high & (value_mask << (BITS * (i - HALF)))
            step = 1 << (BITS * (i % HALF))
            # (q - zero) * step, exactly
            delta = (field | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + zero * step)
            k = offs_r * PACK + i  # [1, ROWS, 1], from k0
            k_mask = m_mask if EVEN_K else m_mask & (k0 + k < K)
            if HAS_PERM:
                col = tl.load(perm_ptr + k0 + k, mask=k_mask, other=0)
                xs = tl.load(x_rows + x_offs + col, mask=k_mask, other=0.0)
            else:
                xs = tl.load(x_rows + k0 + x_offs + k, mask=k_mask, other=0.0)
            xs = xs.to(tl.float32)  # [BLOCK_M, ROWS, 1]
            part += (xs * (1.0 / step)) * delta  # x * 2**-S: exact, a power of two
        acc += tl.sum(part * scale, axis=1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = pid_m * tl.num_programs(0) + pid_n
    _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr, lock_ptr,
                split, num_splits, tile, SPLIT, HAS_BIAS, REDUCE_CHUNK)


@triton.jit(do_not_specialize=["M", "tiles_per_split", "num_splits"])
def _tiled_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, num_splits,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, REDUCE_CHUNK: tl.constexpr,
):
    """One (M x N tile, K split): dequantized [BLOCK_K, BLOCK_N] weight tiles into tl.dot.

    Tiles are numbered in groups of GROUP_M row blocks so that neighbouring programs share
    weight columns in L2. BLOCK_K divides group_size (one scale and zero per column per tile).
    """
    PACK: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    split = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_K // PACK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = (tl.arange(0, PACK) * BITS)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * tiles_per_split * BLOCK_K  # a known multiple of BLOCK_K: aligned loads
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k_mask, other=0)
        else:
            col = k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        rows = k0 // PACK + offs_r
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows < K // PACK)[:, None] & n_mask[None, :], other=0)
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        # [BLOCK_K / PACK, PACK, BLOCK_N] -> [BLOCK_K, BLOCK_N]: row r * PACK + i is value i
        q = ((words[:, None, :] >> shifts) & ((1 << BITS) - 1)) | 0x4B000000
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        w = (q.to(tl.float32, bitcast=True) - (8388608.0 + zero)[None, :]) * scale[None, :]
        w = w.to(x_ptr.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr, lock_ptr,
                split, num_splits, pid, SPLIT, HAS_BIAS, REDUCE_CHUNK)


@triton.jit(do_not_specialize=["M", "tiles_per_split", "num_splits"])
def _tiled_t_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, group_size, tiles_per_split, num_splits,
    value_mask,  # 2**BITS - 1 in a register: the AND and the OR fuse into one LOP3
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, REDUCE_CHUNK: tl.constexpr,
):
    """Small batches (decode): out^T = W^T x^T. The weight tile [BLOCK_N, BLOCK_K] is the MMA's
    wide left operand, each thread holding the PACK values of a word consecutive along K, and
    the batch (BLOCK_M >= 16, padded) the narrow right operand. The MMA multiplies the raw
    integers q (exact in bf16 / fp16); scale and zero apply per tile, one group:
    sum_k x (q - z) s = s (sum_k x q - z sum_k x). Per weight: SHF, LOP3, FADD, half an F2FP.
    """
    PACK: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_K // PACK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = (tl.arange(0, PACK) * BITS)[None, None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = split * tiles_per_split * BLOCK_K  # a known multiple of BLOCK_K: aligned loads
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rows = k0 // PACK + offs_r
        words = tl.load(qweight_ptr + offs_n[:, None] + rows[None, :] * N,
                        mask=n_mask[:, None] & (rows < K // PACK)[None, :], other=0)  # [BN, R]
        # [BLOCK_N, BLOCK_K / PACK, PACK] -> [BLOCK_N, BLOCK_K]: column r * PACK + i is value i
        q = ((words[:, :, None] >> shifts) & value_mask) | 0x4B000000
        q = tl.reshape(q, (BLOCK_N, BLOCK_K))
        q = (q.to(tl.float32, bitcast=True) - 8388608.0).to(x_ptr.dtype.element_ty)
        k = k0 + offs_k
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=k < K, other=0)
        else:
            col = k
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + col[:, None],
                     mask=m_mask[None, :] & (k < K)[:, None], other=0.0)  # [BLOCK_K, BLOCK_M]
        x_sum = tl.sum(xt.to(tl.float32), axis=0)  # [BLOCK_M]
        if UPCAST:
            q = q.to(tl.float32)
            xt = xt.to(tl.float32)
        d = tl.dot(q, xt, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M] sum_k q x
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += (d - zero[:, None] * x_sum[None, :]) * scale[:, None]
    tile = pid_m * tl.num_programs(0) + pid_n
    _store_tile(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, stride_om, bias_ptr, part_ptr,
                lock_ptr, split, num_splits, tile, SPLIT, HAS_BIAS, REDUCE_CHUNK)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 4  # default_config uses the GEMV up to this M
_LOCK_SLOTS = 1 << 16  # split-K tile counters per device; a launch with more tiles does not split


@dataclass(frozen=True)
class QuantMatmulConfig:
    """One kernel call's kernel, tile shape and launch shape. kernel: "gemv" (block_m <= 8),
    "tiled" (x [BM, BK] @ w [BK, BN]) or "tiled_t" (w^T [BN, BK] @ x^T [BK, BM], half
    activations only). split_k: K splits, or None to split until ~waves x SMs programs run."""
    kernel: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    waves: float = 2.0
    split_k: int | None = None

    def __post_init__(self):
        if self.kernel not in ("gemv", "tiled", "tiled_t"):
            raise ValueError(f"kernel must be gemv, tiled or tiled_t, got {self.kernel!r}")
        if self.kernel == "gemv" and self.block_m > 8:
            raise ValueError(f"the GEMV kernel takes block_m <= 8, got {self.block_m}")


def default_config(m: int) -> QuantMatmulConfig:
    """Block sizes by batch size (the M of a decode step is its batch): the configs that
    bench/bench_quant.py's sweep chose on an H100 (Llama-3-8B projections; bench/RESULTS.md)."""
    # GEMV: 4 columns per thread (16-byte loads) and the rows of a tile in one thread, so the
    # sum over a tile stays in registers; rows x block_k kept small enough not to spill.
    if m == 1:
        return QuantMatmulConfig("gemv", 1, 256, 64, 2, 1, waves=4.0)
    if m == 2:
        return QuantMatmulConfig("gemv", 2, 256, 32, 2, 1, waves=4.0)
    if m <= GEMV_MAX_M:
        return QuantMatmulConfig("gemv", 4, 256, 32, 4, 1, waves=4.0)
    if m <= 16:
        return QuantMatmulConfig("tiled", 16, 128, 128, 4, 3, waves=2.0)
    if m <= 32:
        return QuantMatmulConfig("tiled", 32, 128, 64, 4, 3, waves=2.0)
    if m <= 64:
        return QuantMatmulConfig("tiled", 64, 128, 64, 4, 3, waves=2.0)
    return QuantMatmulConfig("tiled", 128, 128, 64, 8, 3, waves=1.0)


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(m) if m <= 64 else 128


def _configs_from_env() -> dict[int, QuantMatmulConfig]:
    """TEXTGEN_QUANT_CONFIGS: a JSON file {"M bucket": {QuantMatmulConfig fields}} (written by
    bench/bench_quant.py --save-configs) replacing default_config for those buckets."""
    path = os.environ.get("TEXTGEN_QUANT_CONFIGS")
    if not path:
        return {}
    with open(path) as f:
        return {int(bucket): QuantMatmulConfig(**fields) for bucket, fields in json.load(f).items()}


# M bucket -> config, consulted before default_config (the bench's sweep fills it).
CONFIG_BY_BUCKET: dict[int, QuantMatmulConfig] = _configs_from_env()


def choose_config(m: int, dtype: torch.dtype = torch.bfloat16) -> QuantMatmulConfig:
    if dtype == torch.float32 and m > GEMV_MAX_M:
        # exact float32 products (parity tests) run on CUDA cores: small tiles, no spills
        return QuantMatmulConfig("tiled", 16 if m <= 16 else 32, 64, 32, 4, 2, waves=1.0)
    return CONFIG_BY_BUCKET.get(m_bucket(m)) or default_config(m)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small "machine" so that tiny test shapes still split


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device) -> torch.Tensor:
    """Zeroed tile counters, allocated once per device and never reallocated (CUDA graphs keep
    their address); every split launch leaves them zero again."""
    if device not in _LOCKS:
        _LOCKS[device] = torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)
    return _LOCKS[device]


def _pow2_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1)


def _block_k(requested: int, group_size: int, minimum: int) -> int:
    """The largest power of two <= requested that divides group_size (tiles stay in a group)."""
    block = _pow2_floor(requested)
    while block > minimum and group_size % block:
        block //= 2
    if group_size % block:
        raise ValueError(f"group_size {group_size} has no tile size >= {minimum} dividing it")
    return block


def _check(x, qweight, scales, zeros, group_size, bits, perm, bias, out):
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] {_DTYPES} with contiguous rows, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    m, k = x.shape
    pack = 32 // bits
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or not qweight.is_contiguous() \
            or qweight.shape[0] * pack != k:
        raise ValueError(f"qweight must be a contiguous int32 [K // {pack}, N] = [{k // pack}, N], "
                         f"got {tuple(qweight.shape)} {qweight.dtype}")
    n = qweight.shape[1]
    groups = -(-k // group_size)
    for name, t, dtypes in (("scales", scales, _SCALE_DTYPES), ("zeros", zeros, _SCALE_DTYPES)):
        if t.shape != (groups, n) or t.dtype not in dtypes or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{groups}, {n}] in {dtypes}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if perm is not None and (perm.shape != (k,) or perm.dtype != torch.int32
                             or not perm.is_contiguous()):
        raise ValueError(f"perm must be a contiguous int32 [{k}], got {tuple(perm.shape)} "
                         f"{perm.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}], got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("perm", perm),
                    ("bias", bias), ("out", out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if out is not None and (out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1):
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor, group_size: int, bits: int,
                 perm: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None,
                 config: QuantMatmulConfig | None = None) -> torch.Tensor:
    """Triton version of quant_matmul_reference: x [M, K] -> [M, N] in x's dtype.

    group_size is the resolved size (K for GPTQ's -1). No host sync; safe to capture in a
    CUDA graph (the split-K counters are allocated on the first call, outside capture).
    """
    _check(x, qweight, scales, zeros, group_size, bits, perm, bias, out)
    m, k = x.shape
    n = qweight.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg = config or choose_config(m, x.dtype)
    kernel = cfg.kernel
    if kernel == "tiled_t" and x.dtype == torch.float32:
        kernel = "tiled"  # its MMA on raw integers assumes half-precision operands
    block_k = _block_k(cfg.block_k, group_size, 32 // bits if kernel == "gemv" else 16)
    k_tiles = triton.cdiv(k, block_k)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    splits = cfg.split_k or max(1, int(cfg.waves * _num_sms(x.device)) // tiles)
    splits = min(splits, k_tiles) if tiles <= _LOCK_SLOTS else 1
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    part = torch.empty((splits, m, n) if splits > 1 else (1,), dtype=torch.float32,
                       device=x.device)
    locks = _locks(x.device) if splits > 1 else part
    dummy = qweight  # stands in for absent optional pointers (never read)
    args = (x, qweight, scales, zeros, dummy if perm is None else perm,
            dummy if bias is None else bias, out, part, locks,
            m, n, k, x.stride(0), out.stride(0), group_size, tiles_per_split, splits)
    common = dict(BITS=bits, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                  SPLIT=splits > 1, HAS_PERM=perm is not None, HAS_BIAS=bias is not None,
                  # splits summed per load by the last program: <= 8, <= 32 floats per thread
                  # (more costs the kernel registers everywhere)
                  REDUCE_CHUNK=_pow2_floor(min(8, max(1, 32 * 32 * cfg.num_warps
                                                      // (cfg.block_m * cfg.block_n)))),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    precision = dict(PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                     UPCAST=_INTERPRET and x.dtype == torch.bfloat16)
    if kernel == "gemv":
        grid = (triton.cdiv(n, cfg.block_n), splits, triton.cdiv(m, cfg.block_m))
        _gemv_kernel[grid](*args, (1 << bits) - 1, EVEN_K=k % block_k == 0, **common)
    elif kernel == "tiled_t":
        grid = (triton.cdiv(n, cfg.block_n), splits, triton.cdiv(m, cfg.block_m))
        _tiled_t_kernel[grid](*args, (1 << bits) - 1, **precision, **common)
    else:
        _tiled_kernel[(tiles, splits)](*args, GROUP_M=8, **precision, **common)
    return out
