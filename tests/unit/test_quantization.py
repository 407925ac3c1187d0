"""GPTQ / AWQ formats: configs, hand-packed tensors of every variant decoded value by value,
act-order permutations, fused shards, and the engine on quantized checkpoints against
transformers running the dequantized weights (greedy, float32, token-exact)."""
import json

import numpy as np
import pytest
import torch

from quant_checkpoints import dequantize, pack_gptq, quantize_rtn, write_quantized
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.layers.ops import TORCH_OPS
from textgen_backend.layers.quantized_linear import QuantizedLinear
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.weights.quantization import (QuantConfig, act_order_permutation,
                                                  decode_checkpoint_layer, read_quant_config,
                                                  resolve_quant_config, unpack_columns, unpack_rows)
from textgen_backend.engine.sequence import Sequence
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


def words(*values: int) -> torch.Tensor:
    """Python ints written as unsigned hex -> int32 words with the same bits."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


# --- hand-packed tensors ---------------------------------------------------------------------

def test_gptq_qweight_packs_along_k_low_bits_first():
    qweight = words(0x76543210, 0xFEDCBA98).reshape(2, 1)  # one column, K = 16
    assert unpack_rows(qweight, 4)[:, 0].tolist() == list(range(16))
    assert unpack_rows(words(0x04030201, 0xFF00807F).reshape(2, 1), 8)[:, 0].tolist() == \
        [1, 2, 3, 4, 0x7F, 0x80, 0, 0xFF]


def test_awq_packs_along_n_in_its_interleaved_order():
    # nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]: nibble values 0..7 land as below
    assert unpack_columns(words(0x76543210).reshape(1, 1), 4,
                          (0, 2, 4, 6, 1, 3, 5, 7))[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpack_columns(words(0x76543210).reshape(1, 1), 4)[0].tolist() == list(range(8))


def gptq_parts(qweight_word: int, qzeros_word: int, k: int = 16) -> dict:
    """K inputs, 8 outputs, one group: every word of qweight is qweight_word, qzeros is one
    word (column n's stored zero in nibble n), scales 0.5."""
    return {"qweight": words(*[qweight_word] * k).reshape(k // 8, 8),
            "qzeros": words(qzeros_word).reshape(1, 1),
            "scales": torch.full((1, 8), 0.5, dtype=torch.float16)}


@pytest.mark.parametrize("fmt,zero_offset", [("gptq", 1), ("gptq_v2", 0)])
def test_gptq_zero_point_conventions(fmt, zero_offset):
    """v1 ("gptq") stores z - 1: w = (q - (qzero + 1)) * s; v2 stores z: w = (q - qzero) * s.
    A stored 15 in v1 reads as 16 (unmasked), as AutoGPTQ's kernels read it."""
    cfg = QuantConfig("gptq", 4, -1, False, False, fmt)
    shard = decode_checkpoint_layer(gptq_parts(0xCCCCCCCC, 0xF7543210), cfg, 16, 8, "layer")
    stored = [0, 1, 2, 3, 4, 5, 7, 15]
    assert shard.zeros[0].tolist() == [z + zero_offset for z in stored]
    assert torch.equal(shard.qvalues, torch.full((16, 8), 12, dtype=torch.int32))
    layer = QuantizedLinear(16, 8, False, TORCH_OPS, cfg)
    layer.load_shard(gptq_parts(0xCCCCCCCC, 0xF7543210), 0, 8, "layer")
    x = torch.zeros(1, 16)
    x[0, 3] = 1.0  # picks weight row 3
    expected = [(12 - z - zero_offset) * 0.5 for z in stored]
    assert layer(x)[0].tolist() == expected


def test_awq_dequantizes_without_zero_offset():
    cfg = QuantConfig("awq", 4, -1, False, False, "awq_gemm")
    # q: every input row holds 0x76543210 -> columns [0, 4, 1, 5, 2, 6, 3, 7]; zeros the same
    parts = {"qweight": words(*[0x76543210] * 16).reshape(16, 1),
             "qzeros": words(0x11111111).reshape(1, 1),
             "scales": torch.tensor([[1, 2, 1, 2, 1, 2, 1, 2]], dtype=torch.float16)}
    layer = QuantizedLinear(16, 8, False, TORCH_OPS, cfg)
    layer.load_shard(parts, 0, 8, "layer")
    out = layer(torch.eye(16)[:1])[0]
    assert out.tolist() == [(q - 1) * s for q, s in zip([0, 4, 1, 5, 2, 6, 3, 7],
                                                        [1, 2, 1, 2, 1, 2, 1, 2])]


def test_eight_bit_gptq_and_symmetric_checkpoints_without_qzeros():
    cfg = QuantConfig("gptq", 8, 16, False, True, "gptq")
    parts = {"qweight": words(*[0x83828180] * 32).reshape(4, 8),  # rows 0..3 of a word: 128..131
             "scales": torch.full((1, 8), 0.25, dtype=torch.float16)}
    layer = QuantizedLinear(16, 8, False, TORCH_OPS, cfg)
    layer.load_shard(parts, 0, 8, "layer")
    out = layer(torch.eye(16)[:4])  # rows k = 0..3 -> q = 128 + k, zero 128
    assert out.tolist() == [[k * 0.25] * 8 for k in range(4)]


def test_act_order_permutation_sorts_groups_and_rejects_uneven_g_idx():
    g_idx = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.int32)  # group_size 3
    perm = act_order_permutation(g_idx, 3, 6)
    assert perm.tolist() == [1, 3, 4, 0, 2, 5]
    assert act_order_permutation(torch.tensor([0, 0, 0, 1, 1, 1]), 3, 6) is None  # identity
    with pytest.raises(ValueError, match="exactly group_size"):
        act_order_permutation(torch.tensor([0, 0, 1, 1, 1, 1]), 3, 6)


def test_act_order_layer_equals_the_dense_weight():
    """A layer loaded from an act-order GPTQ layer computes x @ W^T for W dequantized in input
    order, and two fused shards must share their g_idx."""
    rng = np.random.default_rng()
    w = torch.randn(48, 64)
    perm = rng.permutation(64)
    qz = quantize_rtn(w, 4, 16, False, perm, min_zero=1)
    cfg = QuantConfig("gptq", 4, 16, True, False, "gptq")
    layer = QuantizedLinear(64, 96, False, TORCH_OPS, cfg)
    layer.load_shard(pack_gptq(qz, 4, "gptq"), 0, 48, "a")
    other = quantize_rtn(torch.randn(48, 64), 4, 16, False, perm, min_zero=1)
    layer.load_shard(pack_gptq(other, 4, "gptq"), 48, 48, "b")
    assert layer.perm is not None
    x = torch.randn(5, 64)
    dense = torch.cat([dequantize(qz), dequantize(other)])
    torch.testing.assert_close(layer(x), x @ dense.t(), rtol=1e-5, atol=1e-5)

    mismatched = QuantizedLinear(64, 96, False, TORCH_OPS, cfg)
    mismatched.load_shard(pack_gptq(qz, 4, "gptq"), 0, 48, "a")
    third = quantize_rtn(torch.randn(48, 64), 4, 16, False, rng.permutation(64), min_zero=1)
    with pytest.raises(ValueError, match="g_idx differs"):
        mismatched.load_shard(pack_gptq(third, 4, "gptq"), 48, 48, "b")


def test_shape_errors_name_the_tensor():
    cfg = QuantConfig("gptq", 4, 16, False, False, "gptq")
    parts = gptq_parts(0x11111111, 0x11111111)
    parts["scales"] = torch.ones(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"layer\.scales must be \[1, 8\]"):
        decode_checkpoint_layer(parts, cfg, 16, 8, "layer")


# --- configs ---------------------------------------------------------------------------------

def write_config(tmp_path, **extra):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      **extra}))
    return tmp_path


def test_quant_config_sources(tmp_path):
    gptq = tmp_path / "a"
    gptq.mkdir()
    write_config(gptq, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 64,
                                            "desc_act": True, "sym": False,
                                            "checkpoint_format": "gptq_v2"})
    assert read_quant_config(gptq) == QuantConfig("gptq", 4, 64, True, False, "gptq_v2")
    legacy = tmp_path / "b"
    legacy.mkdir()
    write_config(legacy)
    (legacy / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": -1,
                                                             "desc_act": False, "sym": True}))
    assert read_quant_config(legacy) == QuantConfig("gptq", 8, -1, False, True, "gptq")
    awq = tmp_path / "c"
    awq.mkdir()
    write_config(awq)
    (awq / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 128,
                                                       "zero_point": True, "version": "GEMM"}))
    assert read_quant_config(awq) == QuantConfig("awq", 4, 128, False, False, "awq_gemm")
    plain = tmp_path / "d"
    plain.mkdir()
    write_config(plain)
    assert resolve_quant_config(plain, None) is None
    assert resolve_quant_config(plain, "awq", "dummy") == QuantConfig.default("awq")
    with pytest.raises(ValueError, match="has no quantization config"):
        resolve_quant_config(plain, "gptq")
    with pytest.raises(ValueError, match="--quantize awq, but the checkpoint is gptq"):
        resolve_quant_config(gptq, "awq")
    assert resolve_quant_config(gptq, None).method == "gptq"  # recognized without the flag


@pytest.mark.parametrize("qconfig,message", [
    ({"quant_method": "awq", "version": "gemv"}, "only the GEMM packing"),
    ({"quant_method": "gptq", "bits": 3}, "bits must be one of"),
    ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "group_size": 100}, "multiple of 16"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
])
def test_unsupported_configs_are_refused_clearly(tmp_path, qconfig, message):
    with pytest.raises(ValueError, match=message):
        read_quant_config(write_config(tmp_path, quantization_config=qconfig))


def test_engine_config_quantize_flag():
    assert EngineConfig(quantize="gptq").quantize == "gptq"
    assert EngineConfig(quantize="bitsandbytes-nf4").quantize == "bitsandbytes-nf4"
    with pytest.raises(ValueError, match="quantize must be one of gptq, awq, eetq, fp8, "
                                         "bitsandbytes, .*'marlin'"):
        EngineConfig(quantize="marlin")


# --- the engine against transformers on the dequantized weights ----------------------------

VARIANTS = {
    "gptq-v1-asym-actorder-g32": dict(method="gptq", desc_act=True),
    "gptq-v2-sym-g-1-quantize_config": dict(method="gptq", checkpoint_format="gptq_v2", sym=True,
                                            group_size=-1, config_file="quantize_config.json"),
    "gptq-8bit-g64": dict(method="gptq", bits=8, group_size=64),
    "awq-g32": dict(method="awq"),
}
PROMPTS = [[5, 17, 42, 9, 11], [3, 4], list(range(20, 60))]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Qwen2: quantized Q/K/V with a dense bias beside them
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_greedy_parity_on_quantized_checkpoints(tiny_dir, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    quant_dir, ref_dir = write_quantized(tiny_dir, tmp_path, **VARIANTS[variant])
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    engine = Engine(EngineConfig(model_id=str(quant_dir)), quant_dir)
    # under the LoRA wrapper that serves adapters on top of quantized weights
    assert isinstance(engine.runner.model.layers[0].self_attn.qkv_proj.base, QuantizedLinear)
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=16))
            for i, p in enumerate(PROMPTS)]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    for s in seqs:
        expected = hf.generate(torch.tensor([s.prompt_ids]), max_new_tokens=16,
                               do_sample=False)[0, len(s.prompt_ids):].tolist()
        assert s.output_ids == expected, variant


def test_a_checkpoint_missing_a_quantized_shard_is_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    quant_dir, _ = write_quantized(tiny_dir, tmp_path, method="gptq")
    tensors = load_file(str(quant_dir / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".layers.1.self_attn.k_proj." not in k},
              str(quant_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks quantized weights for 'layers.1.self_attn."
                                         r"qkv_proj' \(got \['layers.1.self_attn.q_proj', "
                                         r"'layers.1.self_attn.v_proj'\]\)"):
        Engine(EngineConfig(model_id=str(quant_dir)), quant_dir)
