"""An fp8 KV cache with an fp8 checkpoint's per-layer scales: a layer stores fp8(k / k_scale)
and attends exactly as over a float cache holding what the fp8 one means (the scales folded
into the softmax scale and the output); the loader takes the scales out of the checkpoint and
gives them to the layers when the cache is fp8."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.layers.attention import AttentionMetadata, PagedAttention
from textgen_backend.layers.ops import TORCH_OPS
from textgen_backend.quantization.kv_scales import apply_kv_scales, take_kv_scales
from textgen_kernels.kv_store import FP8, to_cache_dtype
from textgen_kernels.paged_attention import paged_attention_reference
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

T, HEADS, DIM, BLOCK = 10, 2, 16, 4


def _attend(k_scale: float, v_scale: float, q, k, v):
    layer = PagedAttention(TORCH_OPS, HEADS, HEADS, DIM, None)
    layer.k_scale, layer.v_scale = k_scale, v_scale
    layer.k_cache = torch.zeros(3, BLOCK, HEADS, DIM, dtype=FP8)
    layer.v_cache = torch.zeros(3, BLOCK, HEADS, DIM, dtype=FP8)
    meta = AttentionMetadata(is_decode=False, slot_mapping=torch.arange(T),
                             context_lens=torch.tensor([T], dtype=torch.int32),
                             block_tables=torch.tensor([[0, 1, 2]], dtype=torch.int32),
                             cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32), max_seqlen_q=T)
    return layer(q, k, v, meta), layer, meta


def test_a_scaled_fp8_cache_attends_as_the_float_cache_it_stands_for():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, HEADS, DIM, generator=g) * 0.05
    k = torch.randn(T, HEADS, DIM, generator=g) * 600   # beyond e4m3's 448 without a scale
    v = torch.randn(T, HEADS, DIM, generator=g) * 300
    out, layer, meta = _attend(4.0, 2.0, q, k, v)
    stored = layer.k_cache.reshape(-1, HEADS, DIM)[:T]
    assert torch.equal(stored.view(torch.uint8), to_cache_dtype(k / 4.0, FP8).view(torch.uint8))
    meant_k, meant_v = layer.k_cache.float() * 4.0, layer.v_cache.float() * 2.0
    expected = paged_attention_reference(q, meant_k, meant_v, meta.cu_seqlens_q,
                                         meta.context_lens, meta.block_tables, T, DIM ** -0.5,
                                         None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    unscaled, _, _ = _attend(1.0, 1.0, q, k, v)  # keys and values clipped at 448
    full = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * DIM ** -0.5
                         + torch.full((T, T), float("-inf")).triu(1), dim=-1)
    full = torch.einsum("hqk,khd->qhd", full, v)
    assert (out - full).abs().mean() < (unscaled - full).abs().mean() / 5  # 11 against 124


def test_scales_are_taken_from_the_checkpoint_and_used_with_an_fp8_cache(tmp_path):
    model_dir = build_tiny_model(tmp_path / "m", "llama")
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor([2.0])  # AutoFP8's one scale
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    scales = {}
    rest = dict(take_kv_scales(tensors.items(), scales))
    assert scales == {0: {"k": 0.5, "v": 0.25}, 1: {"k": 2.0, "v": 2.0}}
    assert not any(name.endswith("_scale") for name in rest)

    def layer_scales(kv_cache_dtype):
        engine = Engine(EngineConfig(model_id=str(model_dir), kv_cache_dtype=kv_cache_dtype,
                                     max_lora_rank=0), model_dir)
        return [(a.k_scale, a.v_scale) for a in engine.runner.model.attention_layers()]

    assert layer_scales("fp8") == [(0.5, 0.25), (2.0, 2.0)]
    assert layer_scales("auto") == [(1.0, 1.0), (1.0, 1.0)]  # a float cache needs none


def test_a_checkpoint_with_some_layers_scaled_is_refused():
    class Model:
        def attention_layers(self):
            return [PagedAttention(TORCH_OPS, 1, 1, 4, None) for _ in range(2)]

    with pytest.raises(ValueError, match="lack layer 1's k_scale or v_scale"):
        apply_kv_scales(Model(), {0: {"k": 1.5, "v": 1.5}, 1: {"k": 1.5}})
