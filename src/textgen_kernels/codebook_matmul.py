"""Fused dequantize + matmul for 4-bit code-book weights: bitsandbytes' NF4 and FP4
(textgen_backend.quantization.formats), read in their own layout.

Layout of W [N, K] (N outputs, K inputs; K a multiple of 64):
  data   [N * K / 2] uint8: W flattened row-major, two 4-bit codes a byte, the first (even k)
         in the high nibble.
  absmax [N * K / 64] float32: one per block of 64 consecutive values (a block never leaves its
         row since 64 divides K): w[n, k] = code[q[n, k]] * absmax[(n * K + k) // 64].
  code   [16] float32: the code book (NF4 or FP4 values).
codebook_matmul(x, ...) = x @ W^T: x [M, K] -> [M, N] in x's dtype.

One kernel: each program dequantizes [BLOCK_N, BLOCK_K] tiles of W in registers (a gather from
the 16-entry code book, one multiply by the block's absmax) and multiplies them with x's
[BLOCK_M, BLOCK_K] tile, on tensor cores (tl.dot) when BLOCK_M >= 16, else with CUDA-core FMAs
(decode). Not yet tuned or measured on a GPU (issue 18).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCKSIZE = 64
# The interpreter's tl.dot multiplies raw bf16 bit patterns: upcast there (as quant_matmul).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dequantize_reference(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         n: int, k: int) -> torch.Tensor:
    """The dense [N, K] float32 weight (any N * K: the last block may be partial)."""
    size = n * k
    q = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:size].long()
    values = torch.nn.functional.pad(code.float()[q], (0, -size % BLOCKSIZE))
    values = values.reshape(-1, BLOCKSIZE) * absmax.float()[:, None]
    return values.reshape(-1)[:size].reshape(n, k)


def codebook_matmul_reference(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
                              code: torch.Tensor, n: int,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the dequantized weight, in x's dtype (the engine's CPU path)."""
    w = dequantize_reference(data, absmax, code, n, x.shape[-1]).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@triton.jit(do_not_specialize=["M"])
def _codebook_kernel(x_ptr, data_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_xm, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)     # byte within the tile's row slice
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # every row of the tile starts at a byte: k0 and K are even
        byte = (offs_n[:, None] * K + k0) // 2 + offs_b[None, :]
        packed = tl.load(data_ptr + byte, mask=n_mask[:, None], other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed >> 4, packed & 0xF), (BLOCK_N, BLOCK_K))
        block = (offs_n[:, None] * K + k0 + offs_k[None, :]) // 64
        scale = tl.load(absmax_ptr + block, mask=n_mask[:, None], other=0.0)
        w = tl.load(code_ptr + codes) * scale                       # [BLOCK_N, BLOCK_K] f32
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                    mask=m_mask[:, None], other=0.0)
        if USE_DOT:
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)))
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :]
                          * w.to(x.dtype).to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def codebook_matmul(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
                    code: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of codebook_matmul_reference: x [M, K] -> [M, N] in x's dtype. No host
    sync: safe to capture in a CUDA graph."""
    m, k = x.shape
    if k % BLOCKSIZE or data.dtype != torch.uint8 or data.numel() * 2 != n * k:
        raise ValueError(f"codebook_matmul: K ({k}) must be a multiple of {BLOCKSIZE} and data "
                         f"N * K / 2 uint8 values (got {data.numel()} {data.dtype}, N {n})")
    if absmax.numel() != n * k // BLOCKSIZE or code.numel() != 16:
        raise ValueError("codebook_matmul: absmax must hold N * K / 64 values, code 16")
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    use_dot = m > 8
    block_m = 32 if use_dot else triton.next_power_of_2(m)
    block_n, block_k = (64, 64) if use_dot else (32, 128 if k % 128 == 0 else 64)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _codebook_kernel[grid](x, data, absmax, code, bias if bias is not None else x, out, m, n, k,
                           x.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                           BLOCK_K=block_k, USE_DOT=use_dot,
                           UPCAST=_INTERPRET and x.dtype != torch.float32,
                           HAS_BIAS=bias is not None)
    return out
