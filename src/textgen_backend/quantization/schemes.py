"""Which --quantize values are quantized on the fly, the checkpoints other tools quantized that
are decoded while loading and served as one of them, and the swap of a loaded dense model's
projections (attention and MLP; embeddings, norms and lm_head stay as they are, as in TGI)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from textgen_backend.config import QUANTIZE
from textgen_backend.layers.ops import Ops
from textgen_backend.quantization.bnb_checkpoint import (dequantize_bnb_weights,
                                                         read_bnb_checkpoint)
from textgen_backend.quantization.fp8_checkpoint import dequantize_fp8_weights, read_fp8_checkpoint
from textgen_backend.quantization.linear import OnTheFlyQuantizedLinear, eetq_linear
from textgen_backend.weights.quantization import QUANT_METHODS

logger = logging.getLogger("textgen")

ON_THE_FLY = tuple(q for q in QUANTIZE if q not in QUANT_METHODS)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
Weights = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class DecodedCheckpoint:
    """A checkpoint another tool quantized (fp8, bitsandbytes): decoded to dense weights while
    loading, then served as `scheme`, which gives back its values."""
    scheme: str
    description: str
    decode: Callable[[Weights], Iterator[tuple[str, torch.Tensor]]]


def read_decoded_checkpoint(model_dir: str | Path) -> DecodedCheckpoint | None:
    fp8 = read_fp8_checkpoint(model_dir)
    if fp8 is not None:
        return DecodedCheckpoint("fp8", f"fp8 ({fp8.format})",
                                 lambda weights: dequantize_fp8_weights(weights, fp8.block))
    bnb = read_bnb_checkpoint(model_dir)
    if bnb is not None:
        return DecodedCheckpoint(bnb.scheme, f"bitsandbytes ({bnb.scheme})",
                                 lambda weights: dequantize_bnb_weights(weights, bnb))
    return None


def quantize_projections(model: nn.Module, scheme: str, ops: Ops) -> int:
    """Replaces every projection nn.Linear of the model's layers by its quantized form;
    returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for name in PROJECTIONS:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear):
                quantized = (eetq_linear(child, ops) if scheme == "eetq"
                             else OnTheFlyQuantizedLinear(child, scheme, ops))
                setattr(parent, name, quantized)
                count += 1
    logger.info("[textgen] --quantize %s: %d projections quantized on the fly", scheme, count)
    return count
