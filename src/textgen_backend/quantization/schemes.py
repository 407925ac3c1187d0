"""Which --quantize values are quantized on the fly, and the swap of a loaded dense model's
projections (attention and MLP; embeddings, norms and lm_head stay as they are, as in TGI)."""
from __future__ import annotations

import logging

from torch import nn

from textgen_backend.config import QUANTIZE
from textgen_backend.layers.ops import Ops
from textgen_backend.quantization.linear import OnTheFlyQuantizedLinear, eetq_linear
from textgen_backend.weights.quantization import QUANT_METHODS

logger = logging.getLogger("textgen")

ON_THE_FLY = tuple(q for q in QUANTIZE if q not in QUANT_METHODS)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


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
