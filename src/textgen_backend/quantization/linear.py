"""The layers of projections quantized on the fly. eetq's int8 per channel is one case of the
GPTQ kernels' layout (8 bits, one group of all inputs, zero point 128), so it becomes a
QuantizedLinear and runs textgen_kernels.quant_matmul on the GPU. The other schemes keep their
own storage (formats.py) in an OnTheFlyQuantizedLinear: fp8 multiplies with torch's scaled
fp8 matmul (Hopper's fp8 tensor cores on a GPU); NF4 / FP4 run textgen_kernels.codebook_matmul
with our Triton kernels (on the CPU: dequantize into the activations' dtype and multiply);
LLM.int8() multiplies int8 by int8 with torch._int_mm (formats.bnb_int8_linear)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from textgen_backend.layers.ops import Ops
from textgen_backend.layers.quantized_linear import QuantizedLinear
from textgen_backend.quantization import formats
from textgen_backend.weights.quantization import QuantConfig, pack_rows
from textgen_kernels.codebook_matmul import codebook_matmul

WEIGHT_ONLY = ("bitsandbytes-nf4", "bitsandbytes-fp4")
# eetq in the GPTQ layout: 8 bits, a single group, zero points stored as they are (v2)
EETQ_LAYOUT = QuantConfig("gptq", bits=8, group_size=-1, sym=True, checkpoint_format="gptq_v2")


def eetq_linear(linear: nn.Linear, ops: Ops) -> QuantizedLinear:
    """int8 per output channel (formats.quantize_int8_rows) as a QuantizedLinear: the stored
    value is q + 128 with zero point 128, so (stored - zero) * scale is exactly q * scale."""
    q, scale = formats.quantize_int8_rows(linear.weight.detach())
    layer = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                            ops, EETQ_LAYOUT)
    layer.qweight.copy_(pack_rows((q.to(torch.int32) + 128).T, 8))
    layer.scales = scale[None, :].to(layer.qweight.device)
    layer.zeros.fill_(128)
    layer.bias = linear.bias
    return layer


class OnTheFlyQuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, scheme: str, ops: Ops):
        super().__init__()
        self.scheme = scheme
        self.use_kernels = ops.name == "triton"  # NF4 / FP4: textgen_kernels.codebook_matmul
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.bias = linear.bias
        if scheme == "bitsandbytes":
            q, scale = formats.bnb_int8_rows(weight)
        elif scheme == "fp8":
            if self.in_features % 16 or self.out_features % 16:
                raise ValueError(f"--quantize fp8 needs projections whose sizes are multiples "
                                 f"of 16 (fp8 matmuls), got {self.out_features} x "
                                 f"{self.in_features}")
            q, scale = formats.quantize_fp8_rows(weight)
        elif scheme in ("bitsandbytes-nf4", "bitsandbytes-fp4"):
            packed = formats.quantize_4bit(weight, self.quant_type)
            q, scale = packed.data, packed.absmax
            self.register_buffer("code", formats.code_book(self.quant_type, q.device))
            # the kernel reads whole blocks within rows
            self.use_kernels &= self.in_features % formats.BNB_BLOCKSIZE == 0
        else:
            raise ValueError(f"unknown on-the-fly quantization scheme {scheme!r}")
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    @property
    def quant_type(self) -> str:
        return self.scheme.rsplit("-", 1)[-1]

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the weight-only schemes multiply by (float32): the reference's weight."""
        packed = formats.Packed4bit(self.qweight, self.scale,
                                    (self.out_features, self.in_features))
        return formats.dequantize_4bit(packed, self.quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.scheme in WEIGHT_ONLY:
            if not self.use_kernels:
                return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
            out = codebook_matmul(flat, self.qweight, self.scale, self.code, self.out_features,
                                  self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if self.scheme == "fp8":
            out = formats.fp8_matmul(flat, self.qweight, self.scale)
        else:
            out = formats.bnb_int8_linear(flat, self.qweight, self.scale)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias
