"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

import torch
from torch import nn

from textgen_backend.layers.ops import Ops


class RMSNorm(nn.Module):
    def __init__(self, ops: Ops, hidden_size: int, eps: float):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
