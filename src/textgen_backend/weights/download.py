"""`textgen download-weights`: a hub model into the local Hugging Face cache, as TGIS does it.

The weight files with the requested extensions (default .safetensors) come with what serving
needs (config, tokenizer files). A model published only as PyTorch .bin weights gets those,
converted to safetensors in the cache. Serving itself never downloads.
"""
from __future__ import annotations

import logging
from pathlib import Path

from textgen_backend.weights.convert_weights import convert_to_safetensors

logger = logging.getLogger("textgen")

SERVING_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "merges.txt")


def download_weights(model_id: str, revision: str | None = None,
                     extensions: tuple[str, ...] = (".safetensors",),
                     cache_dir: str | None = None) -> Path:
    """Downloads into the hub cache (progress bars from huggingface_hub); returns the snapshot
    directory, which `--model-id MODEL_ID` then resolves offline."""
    from huggingface_hub import HfApi, snapshot_download

    files = [f for f in HfApi().list_repo_files(model_id, revision=revision) if "/" not in f]
    weights = [f for f in files if f.endswith(tuple(extensions))
               or f.endswith(tuple(e + ".index.json" for e in extensions))]
    convert = ".safetensors" in extensions and not any(f.endswith(".safetensors") for f in files)
    if convert:
        weights += [f for f in files if f.startswith("pytorch_model") and f.endswith(
            (".bin", ".bin.index.json"))]
        logger.warning("[textgen] %s has no safetensors weights: downloading its PyTorch .bin "
                       "weights to convert them", model_id)
    if not weights:
        raise FileNotFoundError(f"{model_id} has no files with extensions "
                                f"{', '.join(extensions)}")
    wanted = sorted(set(weights) | {f for f in files if f in SERVING_FILES})
    snapshot = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=wanted))
    if convert:
        convert_to_safetensors(snapshot)
    return snapshot
