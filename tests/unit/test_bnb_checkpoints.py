"""Checkpoints saved by transformers with bitsandbytes (NF4 / FP4, with and without double
quantization; LLM.int8) are served without --quantize: decoded exactly as bitsandbytes decodes
them, quantized again into the very codes and scales they hold, and greedy decoding equals
transformers serving the same checkpoint (float32 on the CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from on_the_fly_reference import greedy, quantize_reference
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.quantization.bnb_checkpoint import dequantize_bnb_weights, read_bnb_checkpoint
from textgen_backend.quantization.linear import OnTheFlyQuantizedLinear
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.weights.loading import iterate_weights
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

PROMPTS = [[5, 17, 42, 9, 11], [3, 4], list(range(20, 60))]
VARIANTS = {
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                             bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("bnb-tiny"), "llama")


def save_bnb(model_dir: Path, out_dir: Path, settings: dict):
    """transformers quantizes the model with bitsandbytes and saves it; returns the quantized
    transformers model too (the reference)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(**settings, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config,
                                                 device_map="cpu", dtype=torch.float32)
    model.save_pretrained(out_dir)
    return AutoModelForCausalLM.from_pretrained(out_dir, device_map="cpu").eval()


def bnb_dense_weight(module) -> torch.Tensor:
    """bitsandbytes' own dequantization of a quantized transformers projection."""
    import bitsandbytes.functional as F

    weight = module.weight
    if hasattr(weight, "quant_state"):
        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data.float() * (weight.SCB.float()[:, None] / 127)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bnb_checkpoints_decode_as_bitsandbytes_does_and_serve_like_transformers(
        tiny_dir, tmp_path, variant):
    quant_dir = tmp_path / variant
    reference = save_bnb(tiny_dir, quant_dir, VARIANTS[variant])
    checkpoint = read_bnb_checkpoint(quant_dir)
    scheme = "bitsandbytes" if variant == "int8" else f"bitsandbytes-{variant[:3]}"
    assert checkpoint.scheme == scheme
    decoded = dict(dequantize_bnb_weights(iterate_weights(quant_dir, "safetensors"), checkpoint))
    q_proj = reference.model.layers[1].self_attn.q_proj
    assert torch.equal(decoded["model.layers.1.self_attn.q_proj.weight"],
                       bnb_dense_weight(q_proj))

    engine = Engine(EngineConfig(model_id=str(quant_dir), max_lora_rank=0), quant_dir)
    layer = engine.runner.model.layers[1].self_attn.o_proj
    assert isinstance(layer, OnTheFlyQuantizedLinear) and layer.scheme == scheme
    theirs = reference.model.layers[1].self_attn.o_proj.weight
    if variant == "int8":  # the checkpoint's own codes and scales, quantized again
        assert torch.equal(layer.qweight, theirs.data) and torch.equal(layer.scale, theirs.SCB)
    else:  # the weights it serves are the checkpoint's (FP4's -0 and +0 may swap codes)
        assert torch.equal(layer.dequantized_weight(),
                           bnb_dense_weight(reference.model.layers[1].self_attn.o_proj))
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=16))
            for i, p in enumerate(PROMPTS)]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    if variant == "int8":
        # transformers' LLM.int8 on the CPU casts activations to float16: the reference is
        # the weights the checkpoint decodes to, under our LLM.int8 rule (whose codes and
        # scales equal the checkpoint's, asserted above)
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        missing, _ = dense.load_state_dict(decoded, strict=False)
        assert not [k for k in missing if "proj" in k], missing
        reference = quantize_reference(dense.eval(), "bitsandbytes")
    for s in seqs:
        assert s.output_ids == greedy(reference, s.prompt_ids, 16), variant


def test_a_bnb_checkpoint_refuses_another_quantize_value(tiny_dir, tmp_path):
    save_bnb(tiny_dir, tmp_path / "nf4", VARIANTS["nf4"])
    with pytest.raises(ValueError, match=r"--quantize eetq, but .* holds bitsandbytes "
                                         r"\(bitsandbytes-nf4\) weights: serve it with "
                                         r"--quantize bitsandbytes-nf4 or without the flag"):
        Engine(EngineConfig(model_id=str(tmp_path / "nf4"), quantize="eetq", max_lora_rank=0),
               tmp_path / "nf4")
