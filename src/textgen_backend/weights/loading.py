"""Finding a model directory and streaming its weights (safetensors; pickled PyTorch .bin
files only when allowed with load_format "pt")."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from textgen_backend.weights.convert_weights import pytorch_weight_files
from textgen_backend.weights.medusa_repo import MEDUSA_WEIGHTS_FILE, with_base_model


def resolve_model_dir(model_id: str, revision: str | None = None,
                      hub_cache: str | None = None) -> Path:
    """A local directory as is; otherwise a hub id looked up offline in the local hub cache.
    A heads-only Medusa repository gives its base model with the heads (medusa_repo.py)."""
    return with_base_model(_model_dir(model_id, revision, hub_cache),
                           lambda base: _model_dir(base, None, hub_cache))


def _model_dir(model_id: str, revision: str | None, hub_cache: str | None) -> Path:
    if os.path.isdir(model_id):
        return Path(model_id).resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, revision=revision, cache_dir=hub_cache,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as exc:
        where = hub_cache or os.environ.get("HF_HUB_CACHE", "the default Hugging Face hub cache")
        raise FileNotFoundError(
            f"model_id {model_id!r} is neither a directory nor in {where} "
            "(models are never downloaded at run time)") from exc


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    # Medusa heads live beside the weights (TGI's layout); speculation/medusa.py loads them
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.name != MEDUSA_WEIGHTS_FILE)
    if not files:
        if pytorch_weight_files(model_dir):
            raise FileNotFoundError(
                f"{model_dir} has only pickled PyTorch weights (*.bin), which can run code when "
                f"loaded: convert them with `textgen convert-to-safetensors {model_dir}`, or "
                f"allow them with --load-format pt")
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def iterate_weights(model_dir: Path, load_format: str = "safetensors"
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one tensor at a time, so peak memory stays near one tensor (one
    shard for .bin files). load_format "pt" falls back to .bin files when there are no
    safetensors."""
    bins = pytorch_weight_files(model_dir)
    if load_format == "pt" and bins and not list(model_dir.glob("*.safetensors")):
        for path in bins:
            yield from torch.load(path, map_location="cpu", weights_only=True).items()
        return
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
