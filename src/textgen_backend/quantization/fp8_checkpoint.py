"""fp8 checkpoints as people publish them, served as --quantize fp8 without the flag:
compressed-tensors' `float-quantized` format (llm-compressor's FP8 / FP8_DYNAMIC schemes:
`weight` float8_e4m3fn with `weight_scale` per tensor or per output channel, maybe a static
`input_scale`) and transformers' / AutoFP8's `quant_method: fp8` (`weight_scale` per tensor, or
`weight_scale_inv` per block of `weight_block_size`). The loader dequantizes each weight to
float32 (w = q * scale) and the model loads it as a dense one; then the fp8 scheme quantizes it
per output channel again, which gives back the checkpoint's own values where its scales were
per channel. Activations are quantized per token whatever the checkpoint's input scales say
(dynamic scales are never less accurate than a static one)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
DROPPED_SUFFIXES = (".input_scale",)  # KV-cache scales pass through: kv_scales.py takes them


@dataclass(frozen=True)
class Fp8Checkpoint:
    format: str                          # "compressed-tensors" or "fp8"
    block: tuple[int, int] | None        # transformers' fine-grained fp8: weight_block_size


def read_fp8_checkpoint(model_dir: str | Path) -> Fp8Checkpoint | None:
    """The checkpoint's fp8 format when config.json's quantization_config describes 8-bit
    float weights in one of those formats; None otherwise. Other compressed-tensors formats
    (int4/int8 packs) are refused by name."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    raw = config.get("quantization_config") or {}
    method = str(raw.get("quant_method", "")).lower()
    if method == "fp8":
        block = raw.get("weight_block_size")
        return Fp8Checkpoint("fp8", (int(block[0]), int(block[1])) if block else None)
    if method != "compressed-tensors":
        return None
    weights = [group.get("weights") or {} for group in raw.get("config_groups", {}).values()]
    if raw.get("format") == "float-quantized" and weights and all(
            w.get("type") == "float" and int(w.get("num_bits", 0)) == 8 for w in weights):
        return Fp8Checkpoint("compressed-tensors", None)
    raise ValueError(f"config.json: compressed-tensors format {raw.get('format')!r} with "
                     f"weights {weights} is not supported (only float-quantized 8-bit weights: "
                     "fp8)")


def dequantize_fp8_weights(weights: Iterable[tuple[str, torch.Tensor]],
                           block: tuple[int, int] | None = None,
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pairs each float8 `X.weight` with its `X.weight_scale` / `X.weight_scale_inv` (in either
    order) and yields `X.weight` in float32; static activation scales are dropped; other
    tensors pass through."""
    pending_weights: dict[str, torch.Tensor] = {}
    pending_scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(DROPPED_SUFFIXES):
            continue
        scale_suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix is not None:
            base = name[:-len(scale_suffix)]
            if base in pending_weights:
                yield f"{base}.weight", _dequantize(pending_weights.pop(base), tensor, block, base)
            else:
                pending_scales[base] = tensor
        elif name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn:
            base = name[:-len(".weight")]
            if base in pending_scales:
                yield name, _dequantize(tensor, pending_scales.pop(base), block, base)
            else:
                pending_weights[base] = tensor
        else:
            yield name, tensor
    if pending_weights or pending_scales:
        raise ValueError(f"fp8 checkpoint: weights without scales "
                         f"{sorted(pending_weights)[:3]} or scales without weights "
                         f"{sorted(pending_scales)[:3]}")


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                name: str) -> torch.Tensor:
    n, k = q.shape
    scale = scale.float()
    if scale.numel() == 1 or scale.shape in ((n,), (n, 1)):   # per tensor, per channel
        return q.float() * scale.reshape(-1, 1)
    if block is not None:
        rows, cols = block
        expected = (-(-n // rows), -(-k // cols))
        if tuple(scale.shape) == expected:
            full = scale.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
            return q.float() * full
    raise ValueError(f"fp8 checkpoint: {name}'s scale has shape {list(scale.shape)}, which "
                     f"fits neither per tensor, per channel [{n}, 1] nor blocks {block} of its "
                     f"weight {list(q.shape)}")
