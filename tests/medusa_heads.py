"""A model directory with random Medusa heads in TGI's format, for the tiny test models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def add_random_medusa(model_dir: Path, out_dir: Path, num_heads: int = 4,
                      num_layers: int = 1, seed: int = 0) -> Path:
    """A copy of model_dir with `medusa_num_heads` / `medusa_num_layers` in its config.json and
    `medusa_lm_head.safetensors` beside its weights (TGI's keys: `i.j.linear.*`, `i.L.weight`)."""
    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            tensors[f"{head}.{layer}.linear.weight"] = 0.1 * torch.randn(hidden, hidden,
                                                                         generator=generator)
            tensors[f"{head}.{layer}.linear.bias"] = torch.zeros(hidden)
        tensors[f"{head}.{num_layers}.weight"] = torch.randn(vocab, hidden, generator=generator)
    save_file(tensors, out_dir / "medusa_lm_head.safetensors")
    config.update(medusa_num_heads=num_heads, medusa_num_layers=num_layers)
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir
