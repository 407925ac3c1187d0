"""What a request's adapter fields name: `adapter_id` + `adapter_source`, or LoRAX's
`adapter_parameters` merge, resolved to directories on this machine and checked against the
base model before the request is accepted (the engine then only loads).

Sources: "local" (a directory path, or a name under --adapter-directory) and "hub" (the local
Hugging Face cache; never downloaded at run time). LoRAX's "s3" and "pbase" are refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from textgen_backend.adapters.merge import (MERGE_STRATEGIES, SIGN_METHODS, MergeParams,
                                            merge_adapters)
from textgen_backend.adapters.peft_format import (AdapterError, AdapterWeights, check_adapter,
                                                  load_adapter)
from textgen_backend.config import ADAPTER_SOURCES, EngineConfig
from textgen_backend.models import model_class
from textgen_backend.models.config import ModelConfig

_MERGE_KEYS = {"adapter_ids", "weights", "merge_strategy", "density", "majority_sign_method",
               "seed"}


@dataclass(frozen=True)
class AdapterRef:
    """The adapter a sequence runs with: one directory, or several merged. `key` identifies
    its weights (what the engine loads once and shares, and the prefix cache keys KV by):
    the directories as their files were when checked (`versions`: each one's newest
    modification time), so an adapter retrained in place is a new one; `name` is what the
    client called it."""
    name: str
    directories: tuple[str, ...]
    merge: MergeParams | None = None
    versions: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return json.dumps([self.directories, self.versions,
                           self.merge.__dict__ if self.merge else None], sort_keys=True)


class AdapterCatalog:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.targets = model_class(model_config).projection_targets(model_config)
        self.num_layers = model_config.num_layers
        self._checked: dict[Path, tuple[float, int]] = {}  # directory -> (mtime, rank)

    def resolve(self, adapter_id: str, source: str, parameters: str) -> AdapterRef | None:
        """A request's adapter, checked; None for the base model. Raises AdapterError."""
        if parameters.strip():
            if adapter_id:
                raise AdapterError("give adapter_id or adapter_parameters, not both")
            return self._merge(parameters, source)
        if not adapter_id:
            return None
        directory = self._checked_directory(adapter_id, source)
        return AdapterRef(adapter_id, (str(directory),), versions=(self._checked[directory][0],))

    def load(self, ref: AdapterRef) -> AdapterWeights:
        """The weights of a resolved adapter (merged when it names several), on the CPU."""
        c = self.config
        loaded = [load_adapter(Path(d), ref.name, self.targets, self.num_layers, c.max_lora_rank,
                               c.load_format) for d in ref.directories]
        return loaded[0] if ref.merge is None else merge_adapters(loaded, ref.merge, ref.name)

    def _merge(self, text: str, source: str) -> AdapterRef:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"adapter_parameters is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise AdapterError("adapter_parameters must be a JSON object")
        unknown = sorted(set(raw) - _MERGE_KEYS)
        if unknown:
            raise AdapterError(f"adapter_parameters has unknown keys {unknown} (known: "
                               f"{sorted(_MERGE_KEYS)})")
        ids = raw.get("adapter_ids")
        if not (isinstance(ids, list) and ids and all(isinstance(i, str) and i for i in ids)):
            raise AdapterError("adapter_parameters.adapter_ids must be a non-empty list of "
                               "adapter ids")
        weights = raw.get("weights") or [1.0] * len(ids)
        if (not isinstance(weights, list) or len(weights) != len(ids) or
                not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
            raise AdapterError(f"adapter_parameters.weights must be {len(ids)} numbers, one per "
                               "adapter id")
        strategy = raw.get("merge_strategy", "linear")
        if strategy not in MERGE_STRATEGIES:
            raise AdapterError(f"adapter_parameters.merge_strategy must be one of "
                               f"{', '.join(MERGE_STRATEGIES)}, got {strategy!r}")
        density = raw.get("density", 1.0)
        if not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise AdapterError(f"adapter_parameters.density must be in (0, 1], got {density!r}")
        sign = raw.get("majority_sign_method", "total")
        if sign not in SIGN_METHODS:
            raise AdapterError(f"adapter_parameters.majority_sign_method must be one of "
                               f"{', '.join(SIGN_METHODS)}, got {sign!r}")
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise AdapterError(f"adapter_parameters.seed must be an integer >= 0, got {seed!r}")
        directories, versions, ranks = [], [], {}
        for adapter_id in ids:
            directory = self._checked_directory(adapter_id, source)
            directories.append(str(directory))
            versions.append(self._checked[directory][0])
            ranks[adapter_id] = self._checked[directory][1]
        if len(set(ranks.values())) > 1:
            raise AdapterError(f"adapter_parameters: merging needs adapters of one rank, got "
                               f"{ranks}")
        params = MergeParams(strategy, tuple(float(w) for w in weights), float(density), sign,
                             seed)
        return AdapterRef("+".join(ids), tuple(directories), params, tuple(versions))

    def _checked_directory(self, adapter_id: str, source: str) -> Path:
        directory = self.directory_of(adapter_id, source)
        mtime = max(p.stat().st_mtime for p in [directory, *directory.iterdir()])
        cached = self._checked.get(directory)
        if cached is None or cached[0] != mtime:
            c = self.config
            lora = check_adapter(directory, adapter_id, self.targets, self.num_layers,
                                 c.max_lora_rank, c.load_format)
            self._checked[directory] = (mtime, lora.rank)
        return directory

    def directory_of(self, adapter_id: str, source: str) -> Path:
        source = source or self.config.adapter_source
        if self.config.max_lora_rank == 0:
            raise AdapterError(f"adapter {adapter_id!r}: this server serves the base model only "
                               "(--max-lora-rank 0)")
        if source in ("s3", "pbase"):
            raise AdapterError(f"adapter_source {source!r} is not supported: it needs the "
                               "network at run time; put the adapter in --adapter-directory "
                               "and use adapter_source local")
        if source not in ADAPTER_SOURCES:
            raise AdapterError(f"adapter_source must be one of {', '.join(ADAPTER_SOURCES)}, "
                               f"got {source!r}")
        if source == "local":
            return self._local(adapter_id)
        return self._hub(adapter_id)

    def _local(self, adapter_id: str) -> Path:
        candidates = [Path(adapter_id)]
        if self.config.adapter_directory and not os.path.isabs(adapter_id):
            candidates.insert(0, Path(self.config.adapter_directory) / adapter_id)
        for candidate in candidates:
            if candidate.is_dir():
                return candidate.resolve()
        where = " or ".join(str(c) for c in candidates)
        raise AdapterError(f"adapter {adapter_id!r} not found: no directory {where} "
                           "(adapter_source local)")

    def _hub(self, adapter_id: str) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(adapter_id, cache_dir=self.config.huggingface_hub_cache,
                                          local_files_only=True))
        except (LocalEntryNotFoundError, ValueError, OSError):
            where = (self.config.huggingface_hub_cache or
                     os.environ.get("HF_HUB_CACHE", "the default Hugging Face hub cache"))
            raise AdapterError(f"adapter {adapter_id!r} not found in {where} (adapter_source "
                               "hub: adapters are never downloaded at run time; for a "
                               "directory give adapter_source local)") from None
