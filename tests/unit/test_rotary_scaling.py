"""Rotary tables against transformers for each rope_scaling type, and TGI's override flags."""

import pytest
import torch

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.layers.rotary import rope_cos_sin_cache
from textgen_backend.models.config import ModelConfig
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.engine.sequence import Sequence
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit
HEAD_DIM, BASE = 64, 10000.0


def hf_inv_freq(rope_parameters, max_position_embeddings=64, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM,
                         max_position_embeddings=max_position_embeddings,
                         rope_parameters={"rope_theta": BASE, **rope_parameters})
    kind = rope_parameters["rope_type"]
    if kind == "default":
        return 1.0 / (BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.int64).float() / HEAD_DIM))
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)[0]


def cos_of(inv_freq, position):
    return torch.cos(position * inv_freq)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_static_scalings_match_transformers(rope):
    table = rope_cos_sin_cache(HEAD_DIM, 200, BASE, None if rope["rope_type"] == "default" else rope)
    inv_freq = hf_inv_freq(rope)
    for p in (0, 1, 31, 150, 199):
        torch.testing.assert_close(table[p, :HEAD_DIM // 2], cos_of(inv_freq, float(p)),
                                   rtol=0, atol=1e-6)


def test_dynamic_rows_use_the_base_for_the_length_that_reaches_them():
    rope = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}
    table = rope_cos_sin_cache(HEAD_DIM, 300, BASE, rope)
    for p in (0, 63, 64, 100, 299):
        expected = cos_of(hf_inv_freq({"rope_type": "dynamic", "factor": 2.0}, 64, seq_len=p + 1),
                          float(p))
        torch.testing.assert_close(table[p, :HEAD_DIM // 2], expected, rtol=0, atol=1e-5)
    plain = rope_cos_sin_cache(HEAD_DIM, 300, BASE, None)
    assert torch.equal(table[:64], plain[:64]) and not torch.allclose(table[200], plain[200])


def test_rope_flags_override_config_and_widen_the_window():
    base = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
                                  "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "max_position_embeddings": 100})
    assert base.with_rope_override(None, None) is base
    linear = base.with_rope_override(None, 2.0)
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert linear.max_position_embeddings == 200
    dynamic = base.with_rope_override("dynamic", 4.0)
    assert dynamic.rope_scaling["original_max_position_embeddings"] == 100
    with pytest.raises(ValueError, match="rope_factor must be > 0"):
        EngineConfig(model_id="m", rope_factor=0)


@pytest.mark.parametrize("scaling, factor", [("linear", 2.0), ("dynamic", 2.0)])
def test_engine_with_rope_flags_matches_transformers_with_that_scaling(tmp_path, scaling, factor):
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path, "llama", max_position_embeddings=32)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.config.rope_parameters = {"rope_type": scaling, "factor": factor, "rope_theta": 10000.0}
    hf = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32)
    hf.load_state_dict(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())
    hf.eval()
    engine = Engine(EngineConfig(model_id=str(model_dir), rope_scaling=scaling,
                                 rope_factor=factor), model_dir)
    assert engine.limits.max_total_tokens == 64  # the window grew by the factor
    prompt = [5, 17, 42, 9, 11, 60, 61, 62, 63, 64]
    seq = Sequence(1, prompt, SamplingParams(), StoppingParams(max_tokens=45, ignore_eos=True))
    engine.add(seq)
    while engine.has_work():
        engine.step()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=45, min_new_tokens=45,
                      do_sample=False)[0, len(prompt):].tolist()
    assert seq.output_ids == out   # decoding runs 23 tokens past the original window of 32
