"""Medusa heads in TGI's format: a model directory whose config.json has `medusa_num_heads` and
`medusa_num_layers` and whose `medusa_lm_head.safetensors` holds, for head i, residual blocks
`i.j.linear.{weight,bias}` (x + SiLU(W x + b)) and the head's vocabulary projection
`i.<num_layers>.weight`. Head i reads the final (normed) hidden state at the position that
produced token t and guesses the token i + 1 places after t."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from textgen_backend.weights.loading import MEDUSA_WEIGHTS_FILE


class _ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """Parameter names are TGI's file's keys under `heads.`."""

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*[_ResidualBlock(hidden_size) for _ in range(num_layers)],
                          nn.Linear(hidden_size, vocab_size, bias=False))
            for _ in range(num_heads))

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> each head's most likely token [T, num_heads]."""
        return torch.stack([head(hidden).argmax(dim=-1) for head in self.heads], dim=1)


def medusa_num_heads(model_dir: Path) -> int:
    """The directory's Medusa heads (0 without medusa_lm_head.safetensors)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    has_heads = (Path(model_dir) / MEDUSA_WEIGHTS_FILE).exists()
    return int(config.get("medusa_num_heads", 0)) if has_heads else 0


def load_medusa(model_dir: Path, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                device: torch.device) -> MedusaHeads | None:
    """The directory's Medusa heads, or None when it has none."""
    from safetensors.torch import load_file

    num_heads = medusa_num_heads(model_dir)
    if not num_heads:
        return None
    weights_path = Path(model_dir) / MEDUSA_WEIGHTS_FILE
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = MedusaHeads(hidden_size, vocab_size, num_heads,
                        int(config.get("medusa_num_layers", 1)))
    state = load_file(weights_path)
    expected = {name.replace("heads.", "", 1) for name in heads.state_dict()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{weights_path} does not match medusa_num_heads / medusa_num_layers "
                         f"of {model_dir}/config.json: missing {missing[:4]}, unexpected "
                         f"{extra[:4]}")
    heads.load_state_dict({f"heads.{name}": tensor for name, tensor in state.items()})
    return heads.to(device=device, dtype=dtype).eval()
