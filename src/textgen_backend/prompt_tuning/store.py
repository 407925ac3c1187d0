"""The prefix store (--prefix-store-path): `prefix_id` -> a checked soft prompt on disk.

A prompt is the directory `<store>/<prefix_id>` holding a PEFT prompt-tuning save
(`adapter_config.json` with peft_type PROMPT_TUNING + `adapter_model.safetensors` with
`prompt_embeddings` [num_virtual_tokens, hidden]) or TGIS's `decoder.pt` (one tensor, loaded
with weights_only). Ids are `[/\\w-]+` and must stay inside the store (no `..`, no absolute
path, no symlink out of it). Checked here, before a request is accepted; the engine then loads
(prompt_tuning/cache.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from textgen_backend.sampling.params import RequestError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"
TGIS_WEIGHTS = "decoder.pt"
_ID = re.compile(r"[/\w\-]+")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PrefixError(RequestError):
    """A prefix that cannot be served; the message names it and says why (to the client)."""


@dataclass(frozen=True)
class PrefixRef:
    """A soft prompt a sequence starts with: `num_virtual_tokens` embeddings read from `path`,
    as it was at `version` (its modification time when checked: a prompt retrained in place
    is a new one, for the prompt cache and the prefix cache)."""
    prefix_id: str
    path: str
    num_virtual_tokens: int
    version: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.path}@{self.version}"


def read_embeddings(path: Path) -> torch.Tensor:
    """The prompt's [num_virtual_tokens, hidden] tensor as stored (a PEFT save or decoder.pt)."""
    if path.name == TGIS_WEIGHTS:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{TGIS_WEIGHTS} holds a {type(tensor).__name__}, not one tensor")
        return tensor
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(PEFT_TENSOR)


class PrefixStore:
    def __init__(self, store_path: str | None, hidden_size: int):
        self.root = Path(store_path).resolve() if store_path else None
        self.hidden_size = hidden_size
        self._checked: dict[Path, tuple[float, int]] = {}  # weights file -> (mtime, tokens)

    def resolve(self, prefix_id: str) -> PrefixRef | None:
        """A request's prefix, checked; None for "". Raises PrefixError."""
        if not prefix_id:
            return None
        if self.root is None:
            raise PrefixError(f"prefix_id {prefix_id!r}: this server has no prefix store "
                              "(start it with --prefix-store-path)")
        path = self._weights_file(prefix_id)
        mtime = path.stat().st_mtime
        cached = self._checked.get(path)
        if cached is None or cached[0] != mtime:
            self._checked[path] = (mtime, self._check(prefix_id, path))
        return PrefixRef(prefix_id, str(path), self._checked[path][1], mtime)

    def _weights_file(self, prefix_id: str) -> Path:
        if (not _ID.fullmatch(prefix_id) or prefix_id.startswith("/") or
                ".." in prefix_id.split("/")):
            raise PrefixError(f"prefix_id {prefix_id!r} is not a valid id: letters, digits, "
                              "_, - and / only, relative to the prefix store, without ..")
        directory = (self.root / prefix_id).resolve()
        if directory != self.root and self.root not in directory.parents:
            raise PrefixError(f"prefix_id {prefix_id!r} leads out of the prefix store")
        if not directory.is_dir():
            raise PrefixError(f"prefix_id {prefix_id!r} not found in the prefix store")
        if (directory / PEFT_WEIGHTS).is_file():
            self._check_peft_config(prefix_id, directory)
            return directory / PEFT_WEIGHTS
        if (directory / TGIS_WEIGHTS).is_file():
            return directory / TGIS_WEIGHTS
        raise PrefixError(f"prefix_id {prefix_id!r}: its directory has neither a PEFT "
                          f"prompt-tuning save ({PEFT_WEIGHTS}) nor {TGIS_WEIGHTS}")

    @staticmethod
    def _check_peft_config(prefix_id: str, directory: Path) -> None:
        try:
            peft_type = json.loads((directory / PEFT_CONFIG).read_text()).get("peft_type")
        except (OSError, ValueError) as exc:
            raise PrefixError(f"prefix_id {prefix_id!r}: unreadable {PEFT_CONFIG} ({exc})") \
                from None
        if peft_type != "PROMPT_TUNING":
            raise PrefixError(f"prefix_id {prefix_id!r}: peft_type {peft_type!r} is not "
                              "PROMPT_TUNING (LoRA adapters go in adapter_id)")

    def _check(self, prefix_id: str, path: Path) -> int:
        try:
            if path.name == TGIS_WEIGHTS:
                tensor = read_embeddings(path)
                shape, dtype = tuple(tensor.shape), tensor.dtype
            else:
                with safe_open(str(path), framework="pt") as f:
                    if PEFT_TENSOR not in f.keys():
                        raise ValueError(f"no {PEFT_TENSOR!r} tensor")
                    piece = f.get_slice(PEFT_TENSOR)
                    shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the client's error
            raise PrefixError(f"prefix_id {prefix_id!r}: cannot read {path.name}: {exc}") \
                from None
        floating = dtype in _FLOATS or str(dtype) in ("F16", "BF16", "F32", "F64")
        if not floating:
            raise PrefixError(f"prefix_id {prefix_id!r}: embeddings of dtype {dtype}, not "
                              "floating point")
        if len(shape) != 2 or shape[1] != self.hidden_size or shape[0] < 1:
            raise PrefixError(f"prefix_id {prefix_id!r}: embeddings of shape {list(shape)}, "
                              f"expected [num_virtual_tokens, {self.hidden_size}] (the model's "
                              "hidden size)")
        return shape[0]

