"""TGI's Medusa repositories (text-generation-inference/*-medusa) hold only the heads: a
config.json with `medusa_num_heads`, `medusa_num_layers` and `base_model_name_or_path`, and
`medusa_lm_head.safetensors`. As TGI does, such a model id serves its base model with those
heads: here as a directory in textgen's cache that links the base model's files, the heads
beside its weights, and the base's config.json with the Medusa fields added."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from textgen_backend.config import default_cache_root

MEDUSA_WEIGHTS_FILE = "medusa_lm_head.safetensors"
_MEDUSA_FIELDS = ("medusa_num_heads", "medusa_num_layers")


def heads_only(model_dir: Path) -> dict | None:
    """The config of a heads-only Medusa repository, else None."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    if "medusa_num_heads" in config and "base_model_name_or_path" in config \
            and "hidden_size" not in config:
        return config
    return None


def with_base_model(model_dir: Path, resolve: Callable[[str], Path]) -> Path:
    """model_dir, or for a heads-only Medusa repository the base model's directory (resolve:
    a model id -> its directory) with these heads beside its weights."""
    config = heads_only(model_dir)
    if config is None:
        return model_dir
    heads = model_dir / MEDUSA_WEIGHTS_FILE
    if not heads.is_file():
        raise FileNotFoundError(f"{model_dir} is a Medusa repository (medusa_num_heads in its "
                                f"config.json) without {MEDUSA_WEIGHTS_FILE}")
    base = resolve(config["base_model_name_or_path"])
    merged_config = json.loads((base / "config.json").read_text())
    merged_config.update({k: config[k] for k in _MEDUSA_FIELDS if k in config})
    key = hashlib.sha256(json.dumps([str(model_dir), str(base), os.stat(heads).st_mtime,
                                     merged_config], sort_keys=True).encode()).hexdigest()[:16]
    merged = default_cache_root() / "medusa" / key
    if not (merged / "config.json").is_file():
        merged.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=merged.parent))  # ours alone
        for entry in base.iterdir():
            if entry.name not in ("config.json", MEDUSA_WEIGHTS_FILE):
                (staging / entry.name).symlink_to(entry.resolve())
        (staging / MEDUSA_WEIGHTS_FILE).symlink_to(heads.resolve())
        (staging / "config.json").write_text(json.dumps(merged_config, indent=2))
        try:
            staging.rename(merged)  # whole or not at all, should two servers start at once
        except OSError:
            shutil.rmtree(staging)
            if not (merged / "config.json").is_file():
                raise
    return merged
