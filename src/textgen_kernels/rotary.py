"""Rotary position embedding (GPT-NeoX / HF Llama "rotate half" layout)."""
import torch
import triton
import triton.language as tl


def rotary_embedding_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] by their token positions [T].

    cos_sin_cache: [max_positions, D] float32, cos in the first D/2 columns, sin in the last.
    Returns new tensors in the input dtype (the math runs in float32, as HF does with its
    float32 cos/sin before casting back).
    """
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated_half = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, tok, stride_x_tok, stride_x_head, stride_o_tok, stride_o_head,
    num_heads, cos, sin,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rotates all heads of one token: [num_heads, 2 * HALF], both halves loaded before storing."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    src = x_ptr + tok * stride_x_tok + offs_h[:, None] * stride_x_head + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    dst = out_ptr + tok * stride_o_tok + offs_h[:, None] * stride_o_head + offs_d[None, :]
    tl.store(dst, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(dst + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr, q_out_ptr, k_out_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head,
    stride_qo_tok, stride_qo_head, stride_ko_tok, stride_ko_head, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    """One token: reads its cos/sin row once and rotates every q and k head."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, tok, stride_q_tok, stride_q_head, stride_qo_tok,
                  stride_qo_head, num_q_heads, cos, sin, HALF, BLOCK_HALF, BLOCK_HQ)
    _rotate_heads(k_ptr, k_out_ptr, tok, stride_k_tok, stride_k_head, stride_ko_tok,
                  stride_ko_head, num_k_heads, cos, sin, HALF, BLOCK_HALF, BLOCK_HK)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_heads(name: str, t: torch.Tensor, num_tokens: int, head_dim: int, dtype) -> None:
    if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(f"{name} must be [{num_tokens}, heads, {head_dim}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}.dtype must be {dtype}, got {t.dtype}")
    if t.stride(2) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous, got strides {t.stride()}")


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rotary_embedding_reference: returns (q_rot, k_rot), new tensors.

    q/k may be strided views (e.g. into a fused QKV output); only the last dim must be
    contiguous. Results go to q_out/k_out when given; rotary_embedding_ rotates in place.
    Positions must index cos_sin_cache's rows (unchecked: checking would sync with the host).
    """
    if q.dtype not in _DTYPES:
        raise ValueError(f"q.dtype must be one of {_DTYPES}, got {q.dtype}")
    num_tokens, head_dim = q.shape[0], q.shape[-1]
    _check_heads("q", q, num_tokens, head_dim, q.dtype)
    _check_heads("k", k, num_tokens, head_dim, q.dtype)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be int32/int64 [{num_tokens}], got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_positions, {head_dim}], got {tuple(cos_sin_cache.shape)}"
        )
    if cos_sin_cache.dtype not in _DTYPES or cos_sin_cache.stride(1) != 1:
        raise ValueError("cos_sin_cache must be a float tensor with contiguous rows")
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _check_heads("q_out", q_out, num_tokens, head_dim, q.dtype)
    _check_heads("k_out", k_out, num_tokens, head_dim, q.dtype)
    if q_out.shape != q.shape or k_out.shape != k.shape:
        raise ValueError("q_out/k_out must have the shapes of q/k")
    devices = {t.device for t in (positions, q, k, cos_sin_cache, q_out, k_out)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_hq = triton.next_power_of_2(q.shape[1])
    block_hk = triton.next_power_of_2(k.shape[1])
    block_half = triton.next_power_of_2(half)
    num_warps = max(1, min(8, block_hq * block_half // 256))
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=num_warps,
    )
    return q_out, k_out


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place variant: rotates q and k where they are (views into a QKV buffer included) and
    returns them. Safe because each program loads a token's both halves before storing."""
    return rotary_embedding(positions, q, k, cos_sin_cache, q_out=q, k_out=k)
