"""Linear layers over GPTQ / AWQ weights, and the loader that fills them from a checkpoint.

A QuantizedLinear holds its weight in the kernels' layout (textgen_kernels.quant_matmul): fused
layers (qkv_proj, gate_up_proj) concatenate their shards' columns, exactly as the dense model
concatenates rows of nn.Linear weights. Biases stay in the model dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from textgen_backend.layers.ops import Ops
from textgen_backend.weights.quantization import (QUANT_TENSORS, QuantConfig, act_order_permutation,
                                                  decode_checkpoint_layer, pack_rows)
from textgen_kernels.quant_matmul import quant_matmul, quant_matmul_reference


def make_linear(in_features: int, out_features: int, bias: bool, ops: Ops,
                quant: QuantConfig | None) -> nn.Module:
    if quant is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return QuantizedLinear(in_features, out_features, bias, ops, quant)


class QuantizedLinear(nn.Module):
    """y = x @ W^T + b with W quantized. Buffers: qweight [K / PACK, N] int32, scales [G, N],
    zeros [G, N] float16, perm [K] int32 or None (act-order). Built with random weights (the
    dummy load format); load_shard overwrites them from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops,
                 quant: QuantConfig):
        super().__init__()
        if in_features % 16:
            raise ValueError(f"quantized layers need in_features divisible by 16, got "
                             f"{in_features}")
        if out_features % quant.pack:
            raise ValueError(f"quantized layers need out_features divisible by {quant.pack}, "
                             f"got {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.quant = quant
        self.bits = quant.bits
        self.group_size = quant.group_size_for(in_features)
        self.use_kernels = ops.name == "triton"
        groups = -(-in_features // self.group_size)
        # Random packed values, symmetric zero, scales giving weights of std ~ 1/sqrt(3 K)
        # (nn.Linear's initialization): the dummy load format's weights, drawn on the device.
        self.register_buffer("qweight", torch.randint(
            -2**31, 2**31 - 1, (in_features // quant.pack, out_features), dtype=torch.int32))
        levels = 1 << quant.bits
        std = math.sqrt((levels * levels - 1) / 12)  # of q - zero for uniform q
        self.register_buffer("scales", torch.full((groups, out_features),
                                                  1 / (std * math.sqrt(3 * in_features)),
                                                  dtype=torch.float16))
        self.register_buffer("zeros", torch.full((groups, out_features), float(levels // 2),
                                                 dtype=torch.float16))
        self.register_buffer("perm", None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._loaded_perm: list[torch.Tensor | None] = []  # one entry per loaded shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.use_kernels:
            out = quant_matmul(x, self.qweight, self.scales, self.zeros, self.group_size,
                               self.bits, self.perm, self.bias)
        else:
            out = quant_matmul_reference(x, self.qweight, self.scales, self.zeros,
                                         self.group_size, self.bits, self.perm, self.bias)
        return out.reshape(*shape[:-1], self.out_features)

    def load_shard(self, parts: dict[str, torch.Tensor], offset: int, size: int,
                   name: str) -> None:
        """Decodes one checkpoint layer into columns [offset, offset + size). Shards of a fused
        layer share its input, hence (act-order) one permutation of the input rows."""
        shard = decode_checkpoint_layer(parts, self.quant, self.in_features, size, name)
        perm = act_order_permutation(shard.g_idx, self.group_size, self.in_features)
        if self._loaded_perm:
            first = self._loaded_perm[0]
            if (first is None) != (perm is None) or (perm is not None and
                                                     not torch.equal(first, perm)):
                raise ValueError(f"{name}: its g_idx differs from the other layers fused with "
                                 "it (act-order shards of one input must share g_idx)")
        else:
            if shard.scales.dtype != self.scales.dtype:  # keep the checkpoint's scale dtype
                self.scales = torch.empty_like(self.scales, dtype=shard.scales.dtype)
            self.perm = None if perm is None else perm.to(self.qweight.device)
        self._loaded_perm.append(perm)
        qvalues = shard.qvalues if perm is None else shard.qvalues[perm.long()]
        columns = slice(offset, offset + size)
        self.qweight[:, columns].copy_(pack_rows(qvalues, self.bits))
        self.scales[:, columns].copy_(shard.scales)
        self.zeros[:, columns].copy_(shard.zeros)


class QuantizedWeightLoader:
    """Collects the per-layer tensors of a quantized checkpoint (qweight, qzeros, scales, g_idx;
    they arrive in any order) and loads each complete layer into its QuantizedLinear, at its
    shard's columns when the layer is fused.

    target(name) maps a checkpoint layer name to (our module name, column offset, size)."""

    def __init__(self, model: nn.Module, quant: QuantConfig, target):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        self.quant = quant
        self.target = target
        self.expected = set(QUANT_TENSORS) - ({"g_idx"} if quant.method == "awq" else set())
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.loaded: dict[str, list[str]] = {n: [] for n in self.layers}

    def accepts(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1] in QUANT_TENSORS

    def add(self, name: str, tensor: torch.Tensor) -> None:
        layer, part = name.rsplit(".", 1)
        parts = self.pending.setdefault(layer, {})
        if part in parts:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        parts[part] = tensor
        if self.expected <= parts.keys():
            self._load(layer, self.pending.pop(layer))

    def _load(self, layer: str, parts: dict[str, torch.Tensor]) -> None:
        module_name, offset, size = self.target(layer)
        if module_name not in self.layers:
            raise ValueError(f"checkpoint layer {layer!r} is quantized but {module_name!r} is "
                             "not a quantized layer of this model")
        self.layers[module_name].load_shard(parts, offset, size, layer)
        self.loaded[module_name].append(layer)

    def finish(self, shards_of) -> None:
        """Loads layers that came without g_idx, then checks every shard of every quantized
        layer arrived. shards_of(module name) -> how many checkpoint layers it fuses."""
        for layer in list(self.pending):
            self._load(layer, self.pending.pop(layer))
        for module_name, loaded in self.loaded.items():
            if len(loaded) != shards_of(module_name):
                raise ValueError(f"checkpoint lacks quantized weights for {module_name!r} "
                                 f"(got {loaded or 'none'})")
