"""The embedding split along the vocabulary over tensor-parallel ranks: rank r holds rows
[r * n, (r + 1) * n); ids outside them look up zeros, and one all-reduce sums the ranks'
lookups into every token's embedding."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from textgen_backend.parallel.group import TensorParallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.rows_per_rank = -(-vocab_size // tp.world_size)
        self.first_row = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first_row
        held = (local >= 0) & (local < self.rows_per_rank)
        out = nn.functional.embedding(torch.where(held, local, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(~held[:, None], 0))
