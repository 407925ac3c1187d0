"""A projection with per-token LoRA deltas: base(x) + B[slot] @ A[slot] @ x for each token's
adapter slot (our shrink / expand kernels, or their references on the CPU)."""
from __future__ import annotations

import torch
from torch import nn

from textgen_backend.layers.ops import Ops


class LoraBatch:
    """The step's adapter slot of every token ([num_tokens] int32, -1 = base model), or None
    when no token uses an adapter; set by the model runner before each forward (a CUDA graph
    captures it as one of its static inputs)."""

    def __init__(self) -> None:
        self.slot_of_token: torch.Tensor | None = None


class LoraProjection(nn.Module):
    """Wraps a projection (dense or quantized). a_slots [S, shards x R, in] and b_slots
    [S, out, shards x R]: a fused projection gives each shard (q, k, v; first output columns
    shard_starts) its own rank range, with B's rows for the other shards zero, unless the
    slot's adapter was trained on the fused projection (shared_ranks[slot] = 1: its ranks
    serve every shard)."""

    def __init__(self, base: nn.Module, num_slots: int, rank_capacity: int,
                 shard_starts: tuple[int, ...], ops: Ops, batch: LoraBatch, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base = base
        self.ops = ops
        self.batch = batch
        self.shard_starts = shard_starts
        self.shared_ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.in_features, self.out_features = base.in_features, base.out_features
        # Uninitialized: a slot is written whole before any token uses it, and the kernels
        # read only the slots tokens name (untouched pages of unused slots cost no memory).
        self.a_slots = torch.empty(num_slots, rank_capacity, self.in_features, dtype=dtype,
                                   device=device)
        self.b_slots = torch.empty(num_slots, self.out_features, rank_capacity, dtype=dtype,
                                   device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        slots = self.batch.slot_of_token
        if slots is None:
            return out
        return self.add_deltas(out, x, slots)

    def add_deltas(self, out: torch.Tensor, x: torch.Tensor,
                   slot_of_token: torch.Tensor) -> torch.Tensor:
        """out += B[slot] @ A[slot] @ x for each token with a slot (in place)."""
        h = self.ops.lora_shrink(x, self.a_slots, slot_of_token)
        return self.ops.lora_expand(out, h, self.b_slots, slot_of_token, self.shard_starts,
                                    self.shared_ranks)
