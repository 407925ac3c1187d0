"""The elementwise/attention operations a model runs, chosen once per engine: our Triton
kernels on a GPU, their pure-torch references on the CPU or with --disable-custom-kernels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from textgen_kernels import activation, kv_store, lora, paged_attention, rmsnorm, rotary


@dataclass(frozen=True)
class Ops:
    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    rotary_embedding: Callable
    silu_and_mul: Callable
    store_kv: Callable
    paged_attention: Callable
    paged_attention_decode: Callable
    lora_shrink: Callable
    lora_expand: Callable


def _store_kv_torch(key, value, k_cache, v_cache, slot_mapping):
    # The torch path never pads a batch, so every slot is real and no masking (host sync) is needed.
    slots = slot_mapping.long()
    for cache, x in ((k_cache, key), (v_cache, value)):
        x = kv_store.to_cache_dtype(x, cache.dtype)
        if cache.dtype == kv_store.FP8:  # index_copy_ has no float8 kernel on the CPU: bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)


TORCH_OPS = Ops(
    name="torch",
    rms_norm=rmsnorm.rms_norm_reference,
    fused_add_rms_norm=rmsnorm.fused_add_rms_norm_reference,
    rotary_embedding=rotary.rotary_embedding_reference,
    silu_and_mul=activation.silu_and_mul_reference,
    store_kv=_store_kv_torch,
    paged_attention=paged_attention.paged_attention_reference,
    paged_attention_decode=paged_attention.paged_attention_decode_reference,
    lora_shrink=lora.lora_shrink_reference,
    lora_expand=lora.lora_expand_reference,
)


def triton_ops() -> Ops:
    return Ops(
        name="triton",
        rms_norm=rmsnorm.rms_norm,
        fused_add_rms_norm=rmsnorm.fused_add_rms_norm,
        rotary_embedding=rotary.rotary_embedding,
        silu_and_mul=activation.silu_and_mul,
        store_kv=kv_store.store_kv,
        paged_attention=paged_attention.paged_attention,
        paged_attention_decode=paged_attention.paged_attention_decode,
        lora_shrink=lora.lora_shrink,
        lora_expand=lora.lora_expand,
    )


def select_ops(device: torch.device, disable_custom_kernels: bool = False) -> Ops:
    if device.type == "cuda" and not disable_custom_kernels:
        return triton_ops()
    return TORCH_OPS
