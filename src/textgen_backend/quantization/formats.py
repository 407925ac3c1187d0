"""The numbers of each on-the-fly scheme, in pure torch: how a weight [N, K] (N outputs, K
inputs) is stored and read back, and how activations are quantized where the scheme does.

- int8 per output channel (EETQ's weight-only scheme): q = round(w / s), s = absmax(row) / 127.
- bitsandbytes 8-bit (LLM.int8()): the same row-wise int8 storage as bitsandbytes lays it out
  (CB = round(w * 127 / SCB), SCB = absmax(row)); the matmul quantizes activation rows the same
  way, except values >= threshold (outliers), which multiply the dequantized weight in floating
  point; each row as bitsandbytes computes it alone (see bnb_int8_matmul).
- bitsandbytes NF4 / FP4: the weight flattened row-major into blocks of 64, each scaled by its
  absmax (float32) to [-1, 1] and rounded to the nearest of 16 code values (NormalFloat4 or
  bitsandbytes' FP4); two codes per byte, the first in the high nibble. No double quantization
  of the absmax values (bitsandbytes' compress_statistics=False).
- fp8 (e4m3): weights per output channel, activations per token, scale = absmax / 448; the
  product is rescaled by both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen_kernels import codebook_matmul

INT8_MAX = 127.0
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
BNB_BLOCKSIZE = codebook_matmul.BLOCKSIZE  # 64, bitsandbytes' default for 4 bits
BNB_INT8_THRESHOLD = 6.0  # bitsandbytes' and TGI's outlier threshold
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits; the sign is bit 3): the values its
# CUDA kernels decode to.
FP4_CODE = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
            -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


# --- int8 per channel (eetq) -----------------------------------------------------------------

def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (int8 [N, K], float32 scales [N])."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


# --- bitsandbytes 8-bit (LLM.int8) -----------------------------------------------------------

def bnb_int8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' row-wise (vector-wise) quantization: (CB int8, SCB = absmax per row)."""
    absmax = matrix.float().abs().amax(dim=1)
    q = torch.round(matrix.float() * (INT8_MAX / absmax.clamp(min=1e-12))[:, None])
    return q.clamp(-INT8_MAX, INT8_MAX).to(torch.int8), absmax


def bnb_int8_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                    threshold: float = BNB_INT8_THRESHOLD) -> torch.Tensor:
    """x [M, K] @ W^T with W stored as (CB, SCB): LLM.int8()'s mixed decomposition, each row
    as bitsandbytes computes that row alone. Values >= threshold are outliers: left out of
    their row's absmax and of the int8 product, they multiply the dequantized weight in
    floating point. (bitsandbytes takes the outlier columns of the whole batch, so a row's
    result would depend on the rows beside it; per row, every request gets the output it gets
    alone.) Float32; the sums in float64, where the order of additions cannot show."""
    x = x.float()
    outliers = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    ca, sca = bnb_int8_rows(x.masked_fill(outliers, 0.0))
    acc = ca.double() @ cb.double().T   # int8 products and their sums: exact in float64
    out = acc * (sca.double()[:, None] * scb.double()[None, :]) / (INT8_MAX * INT8_MAX)
    columns = outliers.any(dim=0).nonzero().flatten()
    if len(columns):
        weight = cb[:, columns].double() * (scb.double()[:, None] / INT8_MAX)
        out = out + (x[:, columns].double() * outliers[:, columns]) @ weight.T
    return out.float()


def bnb_int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                    threshold: float = BNB_INT8_THRESHOLD) -> torch.Tensor:
    """What the server runs for bnb_int8_matmul (its reference): the int8 product with
    torch._int_mm (int8 tensor cores on a GPU; its int32 sums are exact, as the reference's
    float64 ones), scaled in float32; the outliers multiply the weight dequantized in the
    activations' dtype, over every column (masked), so that nothing waits for the host and a
    CUDA graph can hold it. Returns float32."""
    xf = x.float()
    outliers = xf.abs() >= threshold if threshold > 0 else torch.zeros_like(xf, dtype=torch.bool)
    ca, sca = bnb_int8_rows(xf.masked_fill(outliers, 0.0))
    rows = ca.shape[0]
    # cuBLASLt's int8 GEMM wants more than 16 rows, in multiples of 8: zero rows pad it
    padded = torch.nn.functional.pad(ca, (0, 0, 0, max(24, -(-rows // 8) * 8) - rows))
    acc = torch._int_mm(padded, cb.t())[:rows]
    out = acc.float() * (sca[:, None] * (scb[None, :] / (INT8_MAX * INT8_MAX)))
    if threshold > 0:
        weight = cb.to(x.dtype) * (scb[:, None] / INT8_MAX).to(x.dtype)
        out = out + (x * outliers.to(x.dtype)) @ weight.T
    return out


# --- bitsandbytes NF4 / FP4 ------------------------------------------------------------------

@dataclass(frozen=True)
class Packed4bit:
    data: torch.Tensor        # uint8 [ceil(N * K / 2)]
    absmax: torch.Tensor      # float32 [ceil(N * K / 64)]
    shape: tuple[int, int]


def code_book(quant_type: str, device=None) -> torch.Tensor:
    return torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)


def quantize_4bit(weight: torch.Tensor, quant_type: str) -> Packed4bit:
    flat = weight.float().reshape(-1)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % BNB_BLOCKSIZE))
    blocks = padded.reshape(-1, BNB_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    code = code_book(quant_type, flat.device)
    # nearest code value (ties to the lower one: bitsandbytes' midpoint bounds)
    order = torch.argsort(code)
    ordered = code[order]
    bounds = (ordered[1:] + ordered[:-1]) / 2
    q = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    if n % 2:
        q = torch.cat([q, q.new_zeros(1)])
    return Packed4bit((q[0::2] << 4) | q[1::2], absmax, tuple(weight.shape))


def dequantize_4bit(packed: Packed4bit, quant_type: str) -> torch.Tensor:
    """The dense float32 weight: the code-book kernel's reference reads this layout."""
    return codebook_matmul.dequantize_reference(packed.data, packed.absmax,
                                                code_book(quant_type, packed.data.device),
                                                *packed.shape)


# --- fp8 e4m3 --------------------------------------------------------------------------------

def quantize_fp8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (float8_e4m3fn [R, C], float32 scales [R]): per output channel for weights,
    per token for activations."""
    scale = matrix.float().abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    q = (matrix.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale


def fp8_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T with W as (float8 [N, K], scales [N]); x quantized per token. torch's
    scaled matmul: on a GPU with fp8 tensor cores (Hopper) the native fp8 GEMM, accumulating in
    float32 and rescaling each row and column; on the CPU the same product. Float32 on the CPU,
    bfloat16 on a GPU (what row-wise scaling gives there)."""
    xq, x_scale = quantize_fp8_rows(x)
    out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
    return torch._scaled_mm(xq, wq.T, scale_a=x_scale[:, None], scale_b=w_scale[None, :],
                            out_dtype=out_dtype)
