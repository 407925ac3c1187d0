"""transformers with its projections quantized by quantization/formats.py, module by module
(q_proj, k_proj, ... rather than our fused ones): the reference for --quantize eetq, fp8,
bitsandbytes, bitsandbytes-nf4 and bitsandbytes-fp4. Fusing changes nothing when in_features
is a multiple of the 4-bit block (64): blocks never straddle two fused weights."""
from __future__ import annotations

import torch
from torch import nn

from textgen_backend.quantization import formats

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Reference(nn.Module):
    def __init__(self, linear: nn.Linear, scheme: str):
        super().__init__()
        self.scheme, self.bias = scheme, linear.bias
        w = linear.weight.detach()
        if scheme == "eetq":
            self.weight = formats.dequantize_int8_rows(*formats.quantize_int8_rows(w))
        elif scheme.startswith("bitsandbytes-"):
            quant_type = scheme.rsplit("-", 1)[-1]
            self.weight = formats.dequantize_4bit(formats.quantize_4bit(w, quant_type),
                                                  quant_type)
        elif scheme == "fp8":
            self.q, self.s = formats.quantize_fp8_rows(w)
        else:
            self.q, self.s = formats.bnb_int8_rows(w)

    def forward(self, x):
        if self.scheme == "eetq" or self.scheme.startswith("bitsandbytes-"):
            out = x @ self.weight.to(x.dtype).T
        else:
            matmul = formats.fp8_matmul if self.scheme == "fp8" else formats.bnb_int8_matmul
            out = matmul(x.reshape(-1, x.shape[-1]), self.q, self.s).to(x.dtype)
            out = out.reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def quantize_reference(model: nn.Module, scheme: str) -> nn.Module:
    for parent in list(model.modules()):
        for name in PROJECTIONS:
            child = getattr(parent, name, None)
            if isinstance(child, nn.Linear):
                setattr(parent, name, _Reference(child, scheme))
    return model


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return out[0, len(prompt_ids):].tolist()
