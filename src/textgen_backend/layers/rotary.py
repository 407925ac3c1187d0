"""Rotary position embedding: the cos/sin table, with HF's rope_scaling types."""
from __future__ import annotations

import math

import torch
from torch import nn

from textgen_backend.layers.ops import Ops


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] float32, computed exactly as transformers does."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type in ("default", "dynamic"):  # dynamic: see rope_cos_sin_cache
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                     "(supported: default, linear, dynamic, llama3)")


def rope_cos_sin_cache(head_dim: int, max_positions: int, base: float,
                       scaling: dict | None) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each position's angles, then sin.

    Dynamic NTK scaling (HF semantics) raises the base once a sequence outgrows
    original_max_position_embeddings, from the sequence's current length. A token at position p
    is computed when its sequence holds p + 1 tokens, so row p uses the base for length p + 1:
    exactly what transformers applies to each decoded token (keys cached earlier keep the angles
    they were stored with, here as there). A prompt longer than the original window is the one
    difference: transformers rotates all of it with the base of its full length.
    """
    positions = torch.arange(max_positions, dtype=torch.float32)
    if (scaling or {}).get("rope_type") != "dynamic":
        freqs = torch.outer(positions, rope_inv_freq(head_dim, base, scaling))
    else:
        original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
        lengths = torch.clamp(positions.double() + 1, min=original)
        bases = base * ((factor * lengths / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
        # The base in double, the powers in float32: the same arithmetic as transformers.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freqs = 1.0 / bases.float()[:, None] ** exponents[None, :]  # [positions, D/2]
        freqs = positions[:, None] * inv_freqs
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, ops: Ops, head_dim: int, max_positions: int, base: float,
                 scaling: dict | None):
        super().__init__()
        self.ops = ops
        # float32 always: the model's dtype must not touch it
        self.register_buffer("cos_sin_cache",
                             rope_cos_sin_cache(head_dim, max_positions, base, scaling),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
