"""Paged attention as a layer: stores the step's K/V into the cache, then attends over it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from textgen_backend.layers.ops import Ops


@dataclass
class AttentionMetadata:
    """How the step's tokens map onto sequences and cache slots (built by the model runner).

    Prefill packs each sequence's new tokens back to back (cu_seqlens_q); decode has exactly one
    new token per sequence. context_lens counts each sequence's tokens in the cache, new ones
    included; block_tables lists its cache blocks.

    A mixed step (decode rows beside prompt chunks) puts decode_rows one-token sequences first:
    they go through the decode kernel, the others through the prefill kernel, which then reads
    cu_seqlens_q and max_seqlen_q as theirs alone (offsets from their first token). Giving the
    decode rows to the prefill kernel would launch max_seqlen_q / BLOCK_M programs for each
    decode row's one query.
    """
    is_decode: bool
    slot_mapping: torch.Tensor   # [num_tokens] int64
    context_lens: torch.Tensor   # [batch] int32
    block_tables: torch.Tensor   # [batch, max_blocks] int32
    cu_seqlens_q: torch.Tensor   # [batch + 1] int32
    max_seqlen_q: int
    decode_rows: int = 0


class PagedAttention(nn.Module):
    def __init__(self, ops: Ops, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        # An fp8 cache's per-tensor scales (quantization/kv_scales.py): the cache holds k / k_scale
        self.k_scale, self.v_scale = 1.0, 1.0
        # Bound by the KV-cache allocator: [num_blocks, block_size, num_kv_heads, head_dim] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        if self.k_scale != 1.0 or self.v_scale != 1.0:
            k, v = k / self.k_scale, v / self.v_scale
        self.ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        scale = self.scale * self.k_scale  # q . (k_scale k') = k_scale (q . k')
        if meta.is_decode:
            out = self.ops.paged_attention_decode(
                q, self.k_cache, self.v_cache, meta.context_lens, meta.block_tables,
                scale, self.sliding_window)
        else:
            d = meta.decode_rows
            out = self.ops.paged_attention(
                q[d:], self.k_cache, self.v_cache, meta.cu_seqlens_q, meta.context_lens[d:],
                meta.block_tables[d:], meta.max_seqlen_q, scale, self.sliding_window)
            if d:
                out = torch.cat([self.ops.paged_attention_decode(
                    q[:d], self.k_cache, self.v_cache, meta.context_lens[:d],
                    meta.block_tables[:d], scale, self.sliding_window), out])
        return out if self.v_scale == 1.0 else out * self.v_scale
