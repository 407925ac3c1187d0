"""Checkpoints saved by transformers with bitsandbytes quantization (`quant_method:
bitsandbytes` in config.json), served without the flag as --quantize bitsandbytes-nf4 /
bitsandbytes-fp4 (`load_in_4bit`) or bitsandbytes (`load_in_8bit`).

4-bit: `X.weight` uint8, two codes a byte (the first in the high nibble), in blocks of
`blocksize` values each scaled by its absmax; `X.weight.quant_map` the 16 code values;
`X.weight.absmax` float32, or with double quantization (`bnb_4bit_use_double_quant`) uint8
indices into `X.weight.nested_quant_map`, scaled per block of `nested_blocksize` by
`X.weight.nested_absmax`, plus `nested_offset`; `X.weight.quant_state.bitsandbytes__<type>`
the JSON of the rest (shape, blocksize, nested_blocksize, nested_offset).
8-bit (LLM.int8): `X.weight` int8 [N, K] and `X.SCB` float32 [N] (w = CB * SCB / 127),
`X.weight_format` 0 (row-major).

The loader decodes each weight to float32 and the model loads it as a dense one; the scheme then
quantizes it again, which gives back the checkpoint's own codes and scales: a block's (a row's)
largest value is its absmax (its SCB) times the code 1 (127). Decoded in torch here; tests
check it against bitsandbytes' own dequantization.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from textgen_backend.quantization.formats import BNB_BLOCKSIZE, INT8_MAX

_QUANT_STATE = ".weight.quant_state.bitsandbytes__"
_FOUR_BIT_PARTS = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                   ".weight.nested_quant_map")
_EIGHT_BIT_PARTS = (".SCB",)


@dataclass(frozen=True)
class BnbCheckpoint:
    scheme: str   # the --quantize value it is served as


def read_bnb_checkpoint(model_dir: str | Path) -> BnbCheckpoint | None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    raw = config.get("quantization_config") or {}
    if str(raw.get("quant_method", "")).lower() != "bitsandbytes":
        return None
    if raw.get("load_in_4bit"):
        quant_type = raw.get("bnb_4bit_quant_type", "fp4")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"config.json: bitsandbytes bnb_4bit_quant_type {quant_type!r} "
                             "is not supported (nf4 or fp4)")
        return BnbCheckpoint(f"bitsandbytes-{quant_type}")
    if raw.get("load_in_8bit"):
        return BnbCheckpoint("bitsandbytes")
    raise ValueError("config.json: a bitsandbytes quantization_config with neither load_in_4bit "
                     "nor load_in_8bit")


def _parts_of(name: str) -> tuple[str, str] | None:
    """(layer, part) for a companion tensor of a quantized weight, else None."""
    if _QUANT_STATE in name:
        return name.split(_QUANT_STATE)[0], "quant_state"
    for suffix in _FOUR_BIT_PARTS + _EIGHT_BIT_PARTS:
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix.rsplit(".", 1)[1]
    return None


def _decode_4bit(layer: str, packed: torch.Tensor, parts: dict) -> torch.Tensor:
    state = parts["quant_state"]
    if state["blocksize"] != BNB_BLOCKSIZE:
        raise ValueError(f"{layer}: bitsandbytes 4-bit blocksize {state['blocksize']}; only "
                         f"{BNB_BLOCKSIZE} (the default) is supported")
    absmax = parts["absmax"]
    if "nested_absmax" in parts:  # double quantization of the absmax values
        nested = parts["nested_quant_map"][absmax.long()]
        scale = parts["nested_absmax"].repeat_interleave(state["nested_blocksize"])
        absmax = nested * scale[:len(nested)] + state["nested_offset"]
    codes = packed.reshape(-1)
    codes = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()
    rows, cols = state["shape"]
    values = parts["quant_map"].float()[codes[:rows * cols]]
    return (values * absmax.float().repeat_interleave(BNB_BLOCKSIZE)[:rows * cols]).reshape(
        rows, cols)


def _decode_8bit(layer: str, weight: torch.Tensor, parts: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    return weight.float() * (parts["SCB"].float()[:, None] / INT8_MAX)


def dequantize_bnb_weights(weights: Iterable[tuple[str, torch.Tensor]],
                           checkpoint: BnbCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Pairs each quantized `X.weight` with its companions (in any order) and yields it in
    float32; other tensors pass through."""
    four_bit = checkpoint.scheme != "bitsandbytes"
    needed = {"quant_state", "absmax", "quant_map"} if four_bit else {"SCB"}
    packed: dict[str, torch.Tensor] = {}
    parts: dict[str, dict] = {}  # a layer's companions; quant_state parsed

    def complete(layer: str) -> bool:
        have = parts.get(layer, {})
        nested = "nested_offset" in have.get("quant_state", {})
        wanted = needed | ({"nested_absmax", "nested_quant_map"} if nested else set())
        return layer in packed and wanted <= have.keys()

    for name, tensor in weights:
        if name.endswith(".weight_format"):  # 8-bit: how CB is laid out
            if int(tensor) != 0:
                raise ValueError(f"{name}: bitsandbytes 8-bit weight_format {int(tensor)}; "
                                 "only 0 (row-major) is supported")
            continue
        companion = _parts_of(name)
        if companion is not None:
            layer, part = companion
            parts.setdefault(layer, {})[part] = (json.loads(bytes(tensor.tolist()))
                                                 if part == "quant_state" else tensor)
        elif name.endswith(".weight") and (tensor.dtype == torch.uint8 if four_bit
                                           else tensor.dtype == torch.int8):
            layer = name[:-len(".weight")]
            packed[layer] = tensor
        else:
            yield name, tensor
            continue
        if complete(layer):
            decode = _decode_4bit if four_bit else _decode_8bit
            yield f"{layer}.weight", decode(layer, packed.pop(layer), parts.pop(layer))
    leftover = sorted(set(packed) | set(parts))
    if leftover:
        raise ValueError(f"bitsandbytes checkpoint: {leftover[0]} lacks its quantized weight "
                         f"or part of its state ({len(leftover)} incomplete)")
