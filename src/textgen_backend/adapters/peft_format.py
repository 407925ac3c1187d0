"""PEFT LoRA directories (adapter_config.json + adapter_model.safetensors) read, checked against
the base model, and mapped onto our projections (q/k/v into qkv_proj, gate/up into gate_up_proj).

What is served: LoRA on any subset of q/k/v/o/gate/up/down (or on already fused qkv_proj /
gate_up_proj), `r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`. What is
refused, with the reason (never skipped: the answer would silently differ from the adapter's):
DoRA, trained biases, `modules_to_save`, LoRA on embeddings or lm_head, other PEFT types.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from textgen_backend.models.llama import ProjectionTarget
from textgen_backend.sampling.params import RequestError
from textgen_backend.weights.safetensors_read import read_safetensors

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (".default" in older saves)
_TENSOR_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head", "wte", "embed_out")


class AdapterError(RequestError):
    """An adapter that cannot be served; the message names it and says why (to the client)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def scaling(self, module_path: str, rank: int) -> float:
        """PEFT's lora_alpha / r (or / sqrt(r) with rsLoRA), with its per-module alpha pattern
        (the rank comes from the tensors themselves, which rank_pattern shaped)."""
        alpha = _pattern_value(self.alpha_pattern, module_path, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: dict, module_path: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module path by its end."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


@dataclass
class LoraPiece:
    """One checkpoint projection's LoRA in our model: delta = scaling * B @ A, added to rows
    [target.offset, target.offset + target.size) of target.module's output."""
    target: ProjectionTarget
    a: torch.Tensor          # [r, in_features], the checkpoint's dtype
    b: torch.Tensor          # [size, r], the checkpoint's dtype
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class AdapterWeights:
    """A loaded adapter: (layer index, checkpoint projection name) -> its piece."""
    name: str
    config: LoraConfig
    pieces: dict[tuple[int, str], LoraPiece]

    @property
    def max_rank(self) -> int:
        return max(p.rank for p in self.pieces.values())


def read_config(directory: Path, name: str) -> LoraConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {directory} is not a PEFT adapter directory "
                           f"(no {CONFIG_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {exc}") from None
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type!r} is not supported (only "
                           "LORA; prompt tuning is served through prefix_id)")
    if raw.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA (use_dora) is not supported")
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: trained biases (bias={raw['bias']!r}) are not "
                           "supported")
    if raw.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: modules_to_save {raw['modules_to_save']} (fully "
                           "trained modules) are not supported")
    targets = raw.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    for target in targets:
        if any(bad in target for bad in _UNSUPPORTED_TARGETS):
            raise AdapterError(f"adapter {name!r}: LoRA on {target!r} is not supported (only "
                               "attention and MLP projections)")
    try:
        return LoraConfig(rank=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])),
                          use_rslora=bool(raw.get("use_rslora", False)),
                          rank_pattern=dict(raw.get("rank_pattern") or {}),
                          alpha_pattern=dict(raw.get("alpha_pattern") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} lacks a valid r / lora_alpha "
                           f"({exc})") from None


def _weights_file(directory: Path, name: str, load_format: str) -> Path:
    safetensors = directory / SAFETENSORS_FILE
    if safetensors.is_file():
        return safetensors
    pickled = directory / PICKLE_FILE
    if pickled.is_file():
        if load_format != "pt":
            raise AdapterError(f"adapter {name!r}: {directory} has only pickled weights "
                               f"({PICKLE_FILE}), which can run code when loaded: convert them "
                               "to safetensors, or allow them with --load-format pt")
        return pickled
    raise AdapterError(f"adapter {name!r}: {directory} has no {SAFETENSORS_FILE}")


def _tensors(path: Path, header_only: bool) -> dict[str, torch.Tensor | tuple[int, ...]]:
    if path.suffix == ".bin":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) if header_only else v for k, v in loaded.items()}
    if header_only:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return read_safetensors(path)  # without the GIL held: the batch steps meanwhile


def _layout(tensors: dict, name: str, targets: dict[str, ProjectionTarget], num_layers: int,
            max_rank: int) -> dict[tuple[int, str], tuple]:
    """(layer, projection) -> (A, B) tensors or shapes, every one checked against the model."""
    pairs: dict[tuple[int, str], dict[str, object]] = {}
    for tensor_name, value in tensors.items():
        match = _TENSOR_NAME.search(tensor_name)
        if match is None:
            raise AdapterError(f"adapter {name!r}: tensor {tensor_name!r} is not a LoRA A/B of "
                               "an attention or MLP projection (not supported)")
        layer, projection, which = int(match[1]), match[2], match[3]
        if projection not in targets:
            raise AdapterError(f"adapter {name!r}: projection {projection!r} does not exist in "
                               f"the base model (known: {', '.join(sorted(targets))})")
        if layer >= num_layers:
            raise AdapterError(f"adapter {name!r}: layer {layer} does not exist in the base "
                               f"model ({num_layers} layers): a different base model?")
        pairs.setdefault((layer, projection), {})[which] = value
    if not pairs:
        raise AdapterError(f"adapter {name!r}: the weights file holds no LoRA tensors")
    for (layer, projection), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {projection} has lora_"
                               f"{''.join(pair)} without its pair")
        target = targets[projection]
        a_shape, b_shape = (tuple(pair[k].shape) if isinstance(pair[k], torch.Tensor)
                            else pair[k] for k in "AB")
        rank = a_shape[0]
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank:
            raise AdapterError(f"adapter {name!r}: layer {layer} {projection} has lora_A "
                               f"{a_shape} and lora_B {b_shape}, not [r, in] and [out, r]")
        if a_shape[1] != target.in_features or b_shape[0] != target.size:
            raise AdapterError(
                f"adapter {name!r}: layer {layer} {projection} maps {a_shape[1]} -> "
                f"{b_shape[0]} features but the base model's maps {target.in_features} -> "
                f"{target.size}: the adapter was trained for a different base model")
        if rank > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {rank} (layer {layer} {projection}) "
                               f"exceeds max_lora_rank {max_rank}")
    return {key: (pair["A"], pair["B"]) for key, pair in pairs.items()}


def check_adapter(directory: Path, name: str, targets: dict[str, ProjectionTarget],
                  num_layers: int, max_rank: int, load_format: str) -> LoraConfig:
    """Everything load_adapter would refuse, from the config and the tensor headers only."""
    config = read_config(directory, name)
    path = _weights_file(directory, name, load_format)
    _layout(_tensors(path, header_only=True), name, targets, num_layers, max_rank)
    return config


def load_adapter(directory: Path, name: str, targets: dict[str, ProjectionTarget],
                 num_layers: int, max_rank: int, load_format: str) -> AdapterWeights:
    config = read_config(directory, name)
    path = _weights_file(directory, name, load_format)
    layout = _layout(_tensors(path, header_only=False), name, targets, num_layers, max_rank)
    pieces = {}
    for (layer, projection), (a, b) in layout.items():
        target = targets[projection]
        module_path = f"model.layers.{layer}.{target.module.split('.')[0]}.{projection}"
        pieces[(layer, projection)] = LoraPiece(target, a, b,
                                                config.scaling(module_path, a.shape[0]))
    return AdapterWeights(name, config, pieces)
