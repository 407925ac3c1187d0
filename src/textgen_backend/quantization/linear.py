"""The layer of a projection quantized on the fly: its weight in one scheme's storage
(formats.py), its bias in the model dtype. Forward runs the scheme's reference numbers in
torch on every device for now: weight-only schemes dequantize into the activations' dtype and
multiply; fp8 and bitsandbytes 8-bit quantize the activations too and compute in float32.
Our Triton kernels for them (issue 18) will replace these forwards on the GPU."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from textgen_backend.quantization import formats

WEIGHT_ONLY = ("eetq", "bitsandbytes-nf4", "bitsandbytes-fp4")


class OnTheFlyQuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, scheme: str):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = linear.bias
        self.packed4: formats.Packed4bit | None = None
        if scheme == "eetq":
            q, scale = formats.quantize_int8_rows(weight)
        elif scheme == "bitsandbytes":
            q, scale = formats.bnb_int8_rows(weight)
        elif scheme == "fp8":
            q, scale = formats.quantize_fp8_rows(weight)
        elif scheme in ("bitsandbytes-nf4", "bitsandbytes-fp4"):
            self.packed4 = formats.quantize_4bit(weight, self.quant_type)
            q, scale = self.packed4.data, self.packed4.absmax
        else:
            raise ValueError(f"unknown on-the-fly quantization scheme {scheme!r}")
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    @property
    def quant_type(self) -> str:
        return self.scheme.rsplit("-", 1)[-1]

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the weight-only schemes multiply by (float32): the reference's weight."""
        if self.scheme == "eetq":
            return formats.dequantize_int8_rows(self.qweight, self.scale)
        packed = formats.Packed4bit(self.qweight, self.scale,
                                    (self.out_features, self.in_features))
        return formats.dequantize_4bit(packed, self.quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme in WEIGHT_ONLY:
            return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features)
        if self.scheme == "fp8":
            out = formats.fp8_matmul(flat, self.qweight, self.scale)
        else:
            out = formats.bnb_int8_matmul(flat, self.qweight, self.scale)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias
