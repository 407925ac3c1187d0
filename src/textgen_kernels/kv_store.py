"""Writing new tokens' keys and values into the paged KV cache, in the cache's dtype: the
model's, or float8_e4m3fn (--kv-cache-dtype fp8: values saturate at +-448, scale 1)."""
import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: unchanged, or saturated into fp8 e4m3 (its cast overflows to
    NaN)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8) if dtype == FP8 else x


def store_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores key/value [T, Hkv, D] at slots [T] of caches [num_blocks, block_size, Hkv, D].

    slot = block_id * block_size + offset_in_block; a slot of -1 marks a padding token that is
    not stored. Boolean indexing syncs with the host: the engine's torch path never pads and
    calls index_copy_ directly instead.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = to_cache_dtype(key[keep], k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = to_cache_dtype(value[keep], v_cache.dtype)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_key_tok, stride_value_tok,
    ROW: tl.constexpr,  # num_kv_heads * head_dim: one token's slot in the cache
    BLOCK: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    """One (token, chunk of its ROW elements): copies key and value into the token's slot."""
    tok = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return  # padding token
    mask = offs < ROW
    src = tok.to(tl.int64)
    k = tl.load(key_ptr + src * stride_key_tok + offs, mask=mask)
    v = tl.load(value_ptr + src * stride_value_tok + offs, mask=mask)
    if FP8_CACHE:  # saturate: the cast itself overflows to NaN
        k = tl.minimum(tl.maximum(k.to(tl.float32), -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -448.0), 448.0)
    k = k.to(k_cache_ptr.dtype.element_ty)
    v = v.to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of store_kv_reference (same contract; slots of -1 are skipped, no sync).

    key/value may be views into a fused QKV output: only each token's [Hkv, D] must be
    contiguous (stride(2) == 1, stride(1) == D); the token stride is free. Slots must be
    < num_blocks * block_size (unchecked: checking would sync with the host).
    """
    if key.dtype not in _DTYPES:
        raise ValueError(f"key.dtype must be one of {_DTYPES}, got {key.dtype}")
    if value.dtype != key.dtype or k_cache.dtype != v_cache.dtype or \
            k_cache.dtype not in (key.dtype, FP8):
        raise ValueError(
            "key, value, k_cache and v_cache must share one dtype (or the caches be "
            f"float8_e4m3fn), got {key.dtype}, {value.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_tokens = key.shape[0]
    for name, t in (("key", key), ("value", value)):
        if t.shape != (num_tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [{num_tokens}, {num_kv_heads}, {head_dim}], got {tuple(t.shape)}"
            )
        if t.stride(2) != 1 or (num_kv_heads > 1 and t.stride(1) != head_dim):
            raise ValueError(f"{name}'s [Hkv, D] rows must be contiguous, got strides {t.stride()}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be int32/int64 [{num_tokens}], got {slot_mapping.dtype} "
            f"{tuple(slot_mapping.shape)}"
        )
    if slot_mapping.stride(0) != 1:
        raise ValueError("slot_mapping must be contiguous")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    block = min(triton.next_power_of_2(row), 2048)
    # 16-byte accesses: 8 half elements (4 float32) per thread and step
    num_warps = max(1, min(8, block * key.element_size() // (16 * 32)))
    _store_kv_kernel[(num_tokens, triton.cdiv(row, block))](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        ROW=row, BLOCK=block, FP8_CACHE=k_cache.dtype == FP8, num_warps=num_warps,
    )
