"""PyTorch *.bin checkpoints -> safetensors (TGIS's `convert-to-safetensors`).

A pickled .bin file can run code when it is loaded; a safetensors file cannot, and it loads
faster. Each .bin shard becomes a .safetensors shard beside it (with an index when sharded).
A tensor tied to another (lm_head to the embeddings) is saved once, as HF's save_pretrained does.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger("textgen")

BIN_INDEX = "pytorch_model.bin.index.json"


def pytorch_weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's .bin shards: those of its index, else pytorch_model*.bin."""
    index = model_dir / BIN_INDEX
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    return sorted(model_dir.glob("pytorch_model*.bin"))


def convert_to_safetensors(model_dir: Path) -> list[Path]:
    """Writes model.safetensors (or model-0000i-of-0000n.safetensors and their index) from the
    directory's PyTorch weights; returns the files written."""
    bins = pytorch_weight_files(model_dir)
    if not bins:
        raise FileNotFoundError(f"no PyTorch weights (pytorch_model*.bin) in {model_dir}")
    written, weight_map = [], {}
    for number, path in enumerate(bins, 1):
        name = ("model.safetensors" if len(bins) == 1
                else f"model-{number:05d}-of-{len(bins):05d}.safetensors")
        # weights_only: tensors and containers only, no arbitrary objects from the pickle.
        tensors = unshared(torch.load(path, map_location="cpu", weights_only=True))
        save_file(tensors, str(model_dir / name), metadata={"format": "pt"})
        weight_map.update({tensor_name: name for tensor_name in tensors})
        written.append(model_dir / name)
        logger.info("[textgen] %s -> %s (%d tensors)", path.name, name, len(tensors))
    if len(bins) > 1:
        index = model_dir / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        written.append(index)
    return written


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without tied copies (the same tensor under two names: the lm_head name is
    dropped first) and with no two tensors sharing storage (safetensors refuses that)."""
    kept: dict[str, torch.Tensor] = {}
    seen = set()
    for name in sorted(state, key=lambda n: (n.startswith("lm_head."), n)):
        tensor = state[name]
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()))
        if view not in seen:
            seen.add(view)
            kept[name] = tensor
    storages = Counter(t.untyped_storage().data_ptr() for t in kept.values())
    return {name: (t.clone() if storages[t.untyped_storage().data_ptr()] > 1 else t).contiguous()
            for name, t in kept.items()}
