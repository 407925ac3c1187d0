"""Per-tensor scales of an fp8 KV cache, as fp8 checkpoints carry them (compressed-tensors'
kv_cache_scheme: `layers.N.self_attn.k_scale` / `v_scale`; older AutoFP8 exports: one
`kv_scale` for both): a layer stores fp8(k / k_scale) and attends with k_scale folded into the
softmax scale and v_scale into the output (layers/attention.py), so that keys and values larger
than e4m3's 448 keep their range. Without scales (a bf16 checkpoint) they are 1."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger("textgen")

_SUFFIXES = {".self_attn.k_scale": ("k",), ".self_attn.v_scale": ("v",),
             ".self_attn.kv_scale": ("k", "v")}


def take_kv_scales(weights: Iterable[tuple[str, torch.Tensor]],
                   into: dict[int, dict[str, float]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Passes the other tensors through; records layer index -> {"k": scale, "v": scale}."""
    for name, tensor in weights:
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            yield name, tensor
            continue
        layer = int(name[:-len(suffix)].rsplit("layers.", 1)[1])
        for which in _SUFFIXES[suffix]:
            into.setdefault(layer, {})[which] = float(tensor.float().reshape(-1)[0])


def apply_kv_scales(model: nn.Module, scales: dict[int, dict[str, float]]) -> None:
    """Sets each attention layer's scales (a checkpoint must give both, for every layer)."""
    layers = model.attention_layers()
    missing = [i for i in range(len(layers)) if set(scales.get(i, {})) != {"k", "v"}]
    if missing:
        raise ValueError(f"the checkpoint's KV-cache scales lack layer {missing[0]}'s k_scale "
                         f"or v_scale ({len(missing)} layers incomplete)")
    for i, attention in enumerate(layers):
        attention.k_scale, attention.v_scale = scales[i]["k"], scales[i]["v"]
    logger.info("[textgen] fp8 KV cache with the checkpoint's per-layer scales (k_scale %.3g-%.3g)",
                min(s["k"] for s in scales.values()), max(s["k"] for s in scales.values()))
