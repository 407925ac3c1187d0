"""RMSNorm and fused residual-add + RMSNorm."""
import torch
import triton
import triton.language as tl


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> [T, H]; normalizes in float32 and scales after casting back, as HF Llama does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is taken in the model dtype."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr,
    stride_x, stride_residual, stride_out, stride_summed,
    hidden, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """One row. Rounds where the reference does: the sum and the normalized row to x's dtype,
    then weight * row in float32 rounded to the output dtype (torch's promotion of the two).

    The whole row is loaded before anything is stored, so out/summed may alias x/residual.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(summed_ptr + row * stride_summed + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (normed * weight).to(out_ptr.dtype.element_ty),
             mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HIDDEN = 65536  # one row per program, held in registers


def _rows(name: str, t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., H] with a contiguous last dim -> a [rows, H] view (row stride free when 2-D)."""
    if t.shape[-1] != hidden:
        raise ValueError(f"{name} must end in hidden size {hidden}, got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous, got strides {t.stride()}")
    if t.dim() == 2:
        return t
    if not t.is_contiguous():
        raise ValueError(f"{name} must be 2-D or contiguous, got strides {t.stride()}")
    return t.view(-1, hidden)


def _check_out(name: str, out: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> None:
    if out.shape != like.shape or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be {tuple(like.shape)} {dtype} on {like.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )


def _launch(x, residual, weight, eps, out, summed_out):
    hidden = x.shape[-1]
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x and weight dtypes must be in {_DTYPES}, got {x.dtype}, {weight.dtype}")
    if weight.shape != (hidden,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{hidden}], got {tuple(weight.shape)}")
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {_MAX_HIDDEN}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)  # the reference's `weight * normed`
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _check_out("out", out, x, out_dtype)
    x2, out2 = _rows("x", x, hidden), _rows("out", out, hidden)
    if residual is not None:
        if residual.dtype != x.dtype or residual.shape != x.shape or residual.device != x.device:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)} {x.dtype}), got "
                f"{tuple(residual.shape)} {residual.dtype} on {residual.device}"
            )
        if summed_out is None:
            summed_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _check_out("summed_out", summed_out, x, x.dtype)
        r2, s2 = _rows("residual", residual, hidden), _rows("summed_out", summed_out, hidden)
    else:
        r2 = s2 = x2  # unused
    if x2.shape[0] == 0:
        return out, summed_out
    block = triton.next_power_of_2(hidden)
    num_warps = max(1, min(16, block // 512))  # ~16 float32 per thread
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out2, s2,
        x2.stride(0), r2.stride(0), out2.stride(0), s2.stride(0),
        hidden, eps,
        BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=num_warps,
    )
    return out, summed_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of rms_norm_reference: x [..., H] -> [..., H].

    The result dtype is torch.promote_types(x.dtype, weight.dtype), as in the reference.
    Writes into `out` when given; out=x normalizes in place when the dtypes agree.
    """
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    summed_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of fused_add_rms_norm_reference: returns (normed, summed).

    One pass: reads x and residual once, writes both results. Passing out=x and
    summed_out=residual runs it in place (vLLM's convention), with no extra buffers.
    """
    return _launch(x, residual, weight, eps, out, summed_out)
