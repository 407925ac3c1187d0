"""SiLU-and-mul for gated MLPs whose gate and up projections are fused."""
import torch
import torch.nn.functional as F

import triton
import triton.language as tl


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] = [gate | up] -> silu(gate) * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr,
):
    """One (row, chunk of BLOCK output columns). Rounds as the reference's two torch ops do:
    silu(gate) to x's dtype, then the product."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of silu_and_mul_reference: x [..., 2*I] -> [..., I] in x's dtype.

    x's last dim must be contiguous (2-D inputs may have any row stride, higher ranks must be
    contiguous). Writes into `out` when given.
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., 2*I], got {tuple(x.shape)}")
    if x.stride(-1) != 1 or (x.dim() > 2 and not x.is_contiguous()):
        raise ValueError(
            f"x must be 2-D with a contiguous last dim, or contiguous; strides {x.stride()}"
        )
    inter = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if out.shape != out_shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {out_shape} {x.dtype} on {x.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(-1) != 1 or (out.dim() > 2 and not out.is_contiguous()):
        raise ValueError(
            f"out must be 2-D with a contiguous last dim, or contiguous; strides {out.stride()}"
        )
    x2 = x if x.dim() == 2 else x.view(-1, 2 * inter)
    out2 = out if out.dim() == 2 else out.view(-1, inter)
    if x2.shape[0] == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 2048)
    num_warps = max(1, min(8, block // 256))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block, num_warps=num_warps,
    )
    return out
