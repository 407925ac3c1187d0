"""Causal attention over the paged KV cache: prefill (variable-length batch) and decode."""
import functools
import os

import torch
import torch.nn.functional as F

import triton
import triton.language as tl


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of new query tokens over everything their sequence holds in the cache.

    q: [T, Hq, D], the new tokens of B sequences packed back to back (cu_seqlens_q [B+1]).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D]; the new tokens' K/V are already stored.
    context_lens: [B], tokens of each sequence in the cache including its new ones.
    block_tables: [B, max_blocks] int32 block ids (entries past a sequence's blocks are ignored).
    Query j of sequence b sits at position context_lens[b] - q_len[b] + j and attends to
    positions p <= its own (and p > its own - sliding_window when a window is set), as HF does.
    Hq must be a multiple of Hkv (GQA). Returns [T, Hq, D] in q's dtype. Decode is the case
    q_len == 1; prefill after a cached prefix is the general case. No host sync.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    batch = context_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    device = q.device

    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    seq_of_token = torch.repeat_interleave(
        torch.arange(batch, device=device), q_lens, output_size=num_tokens
    )
    index_in_seq = torch.arange(num_tokens, device=device) - cu_seqlens_q[seq_of_token]

    # Pad the packed queries to [B, max_seqlen_q, Hq, D]; padded rows attend to position 0 only.
    q_padded = q.new_zeros(batch, max_seqlen_q, num_q_heads, head_dim)
    q_padded[seq_of_token, index_in_seq] = q
    query_pos = torch.zeros(batch, max_seqlen_q, dtype=torch.long, device=device)
    query_pos[seq_of_token, index_in_seq] = (
        context_lens[seq_of_token] - q_lens[seq_of_token] + index_in_seq
    ).long()

    # Gather each sequence's cache blocks into [B, max_blocks * block_size, Hkv, D].
    blocks = block_tables.long()
    k = k_cache[blocks].flatten(1, 2).to(q.dtype)  # an fp8 cache is read in q's dtype
    v = v_cache[blocks].flatten(1, 2).to(q.dtype)
    key_pos = torch.arange(k.shape[1], device=device)
    # Slots past a sequence's context were never written (or hold another sequence's stale
    # values): zero them, since a masked-out NaN still poisons softmax(scores) @ V.
    unwritten = (key_pos[None, :] >= context_lens[:, None])[:, :, None, None]
    k, v = k.masked_fill(unwritten, 0), v.masked_fill(unwritten, 0)

    allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, Qmax, L]
    if sliding_window is not None:
        allowed &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window

    out = F.scaled_dot_product_attention(
        q_padded.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=allowed[:, None],
        scale=scale,
        enable_gqa=num_q_heads != num_kv_heads,
    )  # [B, Hq, Qmax, D]
    return out.transpose(1, 2)[seq_of_token, index_in_seq]


def paged_attention_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One new query token per sequence: q [B, Hq, D] -> [B, Hq, D]."""
    batch = q.shape[0]
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return paged_attention_reference(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, 1, scale, sliding_window
    )


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
# Interpreted (CPU) runs: numpy has no bfloat16, and the interpreter's tl.dot multiplies raw
# bf16 bit patterns. There the kernels upcast bf16 tiles to float32 right after loading
# (UPCAST), rounding p to bf16 first so the arithmetic still matches the GPU's.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The loops below call no @triton.jit helpers: the interpreter re-patches triton.language at
# every device-function call, which made the CPU tests several times slower.


@triton.jit
def _decode_split_range(ctx_len, split, window, num_splits, BLOCK_N: tl.constexpr):
    """Key range [lo, hi) of one split, and how many splits hold keys.

    The visible keys [max(0, ctx - window), ctx) are cut into BLOCK_N tiles and the tiles dealt
    out evenly to the num_splits splits; the trailing splits get none when there are fewer tiles
    than splits. The reduction kernel recomputes the same count.
    """
    start = tl.maximum(ctx_len - window, 0)
    num_tiles = tl.cdiv(ctx_len - start, BLOCK_N)
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
    num_active = tl.cdiv(num_tiles, tiles_per_split)
    lo = start + split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, ctx_len)
    return lo, hi, num_active


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, context_lens_ptr, block_tables_ptr,
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    window,  # sliding window in tokens; _NO_WINDOW when there is none
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head, stride_bt_seq,
    num_splits,  # a runtime value: one compiled variant serves every batch size
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,  # SPLIT: num_splits > 1
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (sequence, KV head, split): the GROUP query heads of that KV head over one key range.

    Unsplit (num_splits == 1) it writes the normalized output; otherwise the split's normalized
    partial output [GROUP, D] and its running max / sum (log2 domain) for the reduction.
    """
    seq_kv = tl.program_id(0)
    split = tl.program_id(1)
    seq = seq_kv // NUM_KV_HEADS
    kv_head = seq_kv % NUM_KV_HEADS

    ctx_len = tl.load(context_lens_ptr + seq)
    lo, hi, num_active = _decode_split_range(ctx_len, split, window, num_splits, BLOCK_N)
    if SPLIT:
        if split >= num_active:
            return  # no keys here; the reduction never reads this split

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    mask_gd = mask_g[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=mask_gd, other=0.0,
    )  # [BLOCK_G, BLOCK_D]; rows past GROUP are zero padding up to the tl.dot minimum of 16
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = kv_head * HEAD_DIM + offs_d  # [BLOCK_D] within one cache slot
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_mask = offs_n < hi
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=key_mask, other=0)
        slots = block_ids.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
        kv_offs = slots[:, None] * (NUM_KV_HEADS * HEAD_DIM) + head_off[None, :]  # [N, BLOCK_D]
        if BLOCK_D == HEAD_DIM:
            kv_mask = key_mask[:, None]
        else:
            kv_mask = key_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        # q's dtype: the same unless the cache is fp8 (or q was upcast for the interpreter)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_G, N], unscaled
        s = tl.where(key_mask[None, :], s, float("-inf"))
        # every tile holds at least one visible key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one FMA per score; qk_scale > 0
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q_ptr.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # l_i == 0 only for a padded batch row (ctx_len 0): it gets zeros, not 0/0
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_o_seq + heads[:, None] * stride_o_head
            + offs_d[None, :],
            acc.to(out_ptr.dtype.element_ty), mask=mask_gd,
        )
    else:
        row = (seq * (NUM_KV_HEADS * GROUP) + heads).to(tl.int64) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_gd)
        tl.store(part_m_ptr + row, m_i, mask=mask_g)
        tl.store(part_l_ptr + row, l_i, mask=mask_g)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, context_lens_ptr,
    window, stride_o_seq, stride_o_head, num_splits,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,  # BLOCK_S: next power of 2 >= num_splits
):
    """One (sequence, query head): merges the active splits' partial outputs."""
    seq_head = tl.program_id(0)
    seq = seq_head // NUM_Q_HEADS
    head = seq_head % NUM_Q_HEADS
    ctx_len = tl.load(context_lens_ptr + seq)
    _, _, num_active = _decode_split_range(ctx_len, 0, window, num_splits, BLOCK_N)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_active
    row = seq_head.to(tl.int64) * num_splits + offs_s  # [BLOCK_S]
    m = tl.load(part_m_ptr + row, mask=mask_s, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=mask_s, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no active split: all weights 0
    w = tl.where(mask_s, l * tl.exp2(m - m_max), 0.0)  # [BLOCK_S]
    w_sum = tl.sum(w, 0)
    o = tl.load(
        part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    out = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_o_seq + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM,
    )


@triton.jit
def _prefill_inner(
    acc, m_i, l_i, q, q_ptr, k_cache_ptr, v_cache_ptr, bt_row, offs_d, head_off,
    q_pos, ctx_len, window, qk_scale, n_lo, n_hi,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax of the query tile over the key tiles in [n_lo, n_hi).

    MASKED=False only for tiles that every query row sees completely (no causal, window or
    length mask needed); MASKED=True applies all three and tolerates rows with no visible key.
    """
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            key_mask = offs_n < ctx_len
            block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=key_mask, other=0)
        else:
            block_ids = tl.load(bt_row + offs_n // PAGE_SIZE)
        slots = block_ids.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
        kv_offs = slots[:, None] * (NUM_KV_HEADS * HEAD_DIM) + head_off[None, :]  # [N, BLOCK_D]
        if MASKED:
            if BLOCK_D == HEAD_DIM:
                kv_mask = key_mask[:, None]
            else:
                kv_mask = key_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_cache_ptr + kv_offs)
            v = tl.load(v_cache_ptr + kv_offs)
        else:
            k = tl.load(k_cache_ptr + kv_offs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_cache_ptr + kv_offs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        k = k.to(q.dtype)  # see the decode kernel
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, N], unscaled
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & key_mask[None, :]
            if USE_WINDOW:
                visible &= offs_n[None, :] > q_pos[:, None] - window
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            # a row with no visible key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s * qk_scale - m_ref[:, None])  # one FMA per score; qk_scale > 0
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(q_ptr.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
    out_ptr, qk_scale, window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt_seq,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (query tile of BLOCK_M tokens, query head, sequence)."""
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_md = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
                mask=mask_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = ctx_len - q_len + offs_m  # the new tokens are the last q_len of the context

    # Key tiles, aligned to BLOCK_N: [lo, full_lo) masked by the window, [full_lo, full_hi)
    # visible to every row, [full_hi, hi) masked by causality and the context end.
    q_first = ctx_len - q_len + m0
    q_last = ctx_len - q_len + tl.minimum(m0 + BLOCK_M, q_len) - 1
    hi = tl.cdiv(q_last + 1, BLOCK_N) * BLOCK_N
    if USE_WINDOW:
        lo = tl.maximum(q_first - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(q_last - window + 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, hi)
    else:
        lo = 0
        full_lo = 0
    full_hi = (q_first + 1) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_off = (head // GROUP) * HEAD_DIM + offs_d  # [BLOCK_D] within one cache slot
    if USE_WINDOW:
        acc, m_i, l_i = _prefill_inner(
            acc, m_i, l_i, q, q_ptr, k_cache_ptr, v_cache_ptr, bt_row, offs_d, head_off,
            q_pos, ctx_len, window, qk_scale, lo, full_lo, True, USE_WINDOW,
            NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
    acc, m_i, l_i = _prefill_inner(
        acc, m_i, l_i, q, q_ptr, k_cache_ptr, v_cache_ptr, bt_row, offs_d, head_off,
        q_pos, ctx_len, window, qk_scale, full_lo, full_hi, False, USE_WINDOW,
        NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
    acc, m_i, l_i = _prefill_inner(
        acc, m_i, l_i, q, q_ptr, k_cache_ptr, v_cache_ptr, bt_row, offs_d, head_off,
        q_pos, ctx_len, window, qk_scale, full_hi, hi, True, USE_WINDOW,
        NUM_KV_HEADS, PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION, UPCAST)

    # every valid row sees at least its own key, so l_i > 0 where stored
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_md)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_NO_WINDOW = 1 << 30  # "window" larger than any context: the mask never bites
_MAX_DECODE_SPLITS = 64  # bounds the reduction's [splits, D] tile and the workspace


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small "machine" so that tiny test shapes still split


def _precision(dtype: torch.dtype) -> str:
    # float32 caches are the exactness mode (parity tests): keep float32 products exact rather
    # than tf32; half types ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_attention_args(q, k_cache, v_cache, context_lens, block_tables, scale, sliding_window,
                          out):
    """Validates what decode and prefill share; returns (num_kv_heads, group, head_dim, page)."""
    if q.dtype not in _DTYPES:
        raise ValueError(f"q.dtype must be one of {_DTYPES}, got {q.dtype}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(
            f"k_cache/v_cache dtype ({k_cache.dtype}, {v_cache.dtype}) must equal q.dtype "
            f"{q.dtype} (or both be float8_e4m3fn: an fp8 cache)"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"block_size must be a power of two, got {page_size}")
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [tokens, num_q_heads, {head_dim}], got {tuple(q.shape)}")
    if q.stride(2) != 1:
        raise ValueError(f"q's last dimension must be contiguous, got strides {q.stride()}")
    if head_dim > 256:
        raise ValueError(f"head_dim must be at most 256, got {head_dim}")
    num_q_heads = q.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    if context_lens.dim() != 1 or context_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"context_lens must be a 1-D int32/int64 tensor, got {context_lens.dtype} "
            f"{tuple(context_lens.shape)}"
        )
    if context_lens.stride(0) != 1:
        raise ValueError("context_lens must be contiguous")
    batch = context_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be [batch={batch}, max_blocks], got {tuple(block_tables.shape)}"
        )
    if block_tables.dtype not in _INDEX_DTYPES or block_tables.stride(1) != 1:
        raise ValueError(
            f"block_tables must be int32/int64 with contiguous rows, got {block_tables.dtype} "
            f"strides {block_tables.stride()}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, context_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                f"{tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if out.stride(2) != 1:
            raise ValueError(f"out's last dimension must be contiguous, got strides {out.stride()}")
    return num_kv_heads, num_q_heads // num_kv_heads, head_dim, page_size


def _decode_config(
    batch: int, num_kv_heads: int, max_blocks: int, page_size: int, block_d: int,
    dtype: torch.dtype, device: torch.device,
) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_splits, num_warps, num_stages) from shapes and the device only.

    Never from context_lens: the grid must replay unchanged in a CUDA graph. The splits aim at
    about four programs per SM (memory-bound: enough loads in flight on every SM); each split
    then takes an even share of the *actual* context's key tiles, so a short context in a wide
    block table still spreads over the machine.
    """
    if device.type != "cuda":
        block_n = 16  # interpreter: small tiles exercise the multi-tile paths on tiny shapes
    elif block_d <= 128 and dtype != torch.float32:
        block_n = 64
    else:
        block_n = 32
    max_tiles = triton.cdiv(max_blocks * page_size, block_n)
    wanted = triton.cdiv(4 * _num_sms(device), batch * num_kv_heads)
    num_splits = max(1, min(wanted, max_tiles, _MAX_DECODE_SPLITS))
    num_warps = 4
    num_stages = 2 if (block_d > 128 or dtype == torch.float32) else 3
    return block_n, num_splits, num_warps, num_stages


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of paged_attention_decode_reference: q [B, Hq, D] -> out [B, Hq, D].

    Split-KV flash decoding: grid (B * Hkv, splits), each program serving the Hq/Hkv query
    heads of one KV head so K/V are read once; a second kernel merges the splits. The grid
    and workspace depend only on shapes and the device, so the call can be captured in a CUDA
    graph and replayed with other context_lens / block_tables values. Rows with
    context_lens == 0 get zeros. Writes into `out` when given (last dim contiguous).
    """
    num_kv_heads, group, head_dim, page_size = _check_attention_args(
        q, k_cache, v_cache, context_lens, block_tables, scale, sliding_window, out
    )
    batch, num_q_heads, _ = q.shape
    if context_lens.shape[0] != batch:
        raise ValueError(f"context_lens has {context_lens.shape[0]} rows, q has {batch} sequences")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_splits, num_warps, num_stages = _decode_config(
        batch, num_kv_heads, block_tables.shape[1], page_size, block_d, q.dtype, q.device
    )
    _launch_decode(q, k_cache, v_cache, context_lens, block_tables, scale, sliding_window, out,
                   block_n, num_splits, num_warps, num_stages)
    return out


def _launch_decode(q, k_cache, v_cache, context_lens, block_tables, scale, sliding_window, out,
                   block_n, num_splits, num_warps, num_stages):
    """Launches decode with an explicit configuration (the bench sweeps it; tests pin it)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    window = _NO_WINDOW if sliding_window is None else sliding_window
    if num_splits > 1:
        rows = batch * num_q_heads * num_splits
        part_out = torch.empty(rows, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty(rows, dtype=torch.float32, device=q.device)
    else:
        part_out = part_m = part_l = out  # unused
    _decode_split_kernel[(batch * num_kv_heads, num_splits)](
        q, k_cache, v_cache, context_lens, block_tables,
        out, part_out, part_m, part_l,
        scale * _LOG2E, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        num_splits,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=k_cache.shape[1],
        BLOCK_N=block_n, SPLIT=num_splits > 1,
        PRECISION=_precision(q.dtype), UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch * num_q_heads,)](
            out, part_out, part_m, part_l, context_lens,
            window, out.stride(0), out.stride(1), num_splits,
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )


def _prefill_config(
    max_seqlen_q: int, block_d: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the prefill kernel."""
    if device.type != "cuda":
        block_m, block_n, num_warps, num_stages = 32, 16, 4, 1  # interpreter: many tiles
    elif dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 64, 32, 4, 2
    elif block_d <= 128:
        # H100 sweep (bench --sweep, bf16, D=128, causal 1x2048 and 4x1024): 64/64/4/3 led,
        # ~15% ahead of 128/64/8/3 and 128/128/8/3
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 32, 8, 2
    # short query chunks (chunked-prefill tails, speculative decoding): don't pad to BLOCK_M
    block_m = min(block_m, max(16, triton.next_power_of_2(max_seqlen_q)))
    if block_m <= 32:
        num_warps = 4
    return block_m, block_n, num_warps, num_stages


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of paged_attention_reference: q [T, Hq, D] -> out [T, Hq, D].

    Flash-attention over the paged cache: grid (ceil(max_seqlen_q / BLOCK_M), Hq, B); key tiles
    beyond the causal limit or before the sliding window are skipped, and only the boundary
    tiles pay for masks. max_seqlen_q must be >= every q_len (rows past it are not computed).
    Writes into `out` when given (last dim contiguous).
    """
    num_kv_heads, group, head_dim, page_size = _check_attention_args(
        q, k_cache, v_cache, context_lens, block_tables, scale, sliding_window, out
    )
    batch = context_lens.shape[0]
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(
            f"cu_seqlens_q must be [batch + 1 = {batch + 1}], got {tuple(cu_seqlens_q.shape)}"
        )
    if cu_seqlens_q.dtype not in _INDEX_DTYPES or cu_seqlens_q.stride(0) != 1:
        raise ValueError(f"cu_seqlens_q must be contiguous int32/int64, got {cu_seqlens_q.dtype}")
    if cu_seqlens_q.device != q.device:
        raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, q on {q.device}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or q.shape[0] == 0 or max_seqlen_q <= 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _prefill_config(
        max_seqlen_q, block_d, q.dtype, q.device
    )
    _launch_prefill(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                    scale, sliding_window, out, block_m, block_n, num_warps, num_stages)
    return out


def _launch_prefill(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, max_seqlen_q,
                    scale, sliding_window, out, block_m, block_n, num_warps, num_stages):
    """Launches prefill with an explicit configuration (the bench sweeps it; tests pin it)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    batch = context_lens.shape[0]
    grid = (triton.cdiv(max_seqlen_q, block_m), num_q_heads, batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out,
        scale * _LOG2E, _NO_WINDOW if sliding_window is None else sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        PRECISION=_precision(q.dtype), UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
