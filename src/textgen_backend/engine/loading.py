"""The model on one rank, loaded: the checkpoint's weights (its shard of them with tensor
parallelism), quantized if --quantize asks, into a model runner with its adapter slots. The
engine builds rank 0's; a tensor-parallel worker builds its own with the same function."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.adapters.shard_loads import WorkerAdapterLoads
from textgen_backend.adapters.slots import AdapterSlots, bytes_per_slot
from textgen_backend.config import EngineConfig
from textgen_backend.engine.model_runner import ModelRunner
from textgen_backend.layers.ops import select_ops
from textgen_backend.models import build_model, model_class
from textgen_backend.models.config import ModelConfig
from textgen_backend.parallel.group import TensorParallel
from textgen_backend.parallel.layout import ShardLayout
from textgen_backend.quantization.kv_scales import apply_kv_scales, take_kv_scales
from textgen_backend.quantization.schemes import (ON_THE_FLY, quantize_projections,
                                                  read_decoded_checkpoint)
from textgen_backend.weights.loading import iterate_weights
from textgen_backend.weights.quantization import resolve_quant_config

logger = logging.getLogger("textgen")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def choose_dtype(config: EngineConfig, model_config: ModelConfig,
                 device: torch.device) -> torch.dtype:
    if config.dtype:
        return _DTYPES[config.dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model_config.torch_dtype == "float16" else torch.bfloat16


def kv_cache_dtype(config: EngineConfig, dtype: torch.dtype,
                   device: torch.device) -> torch.dtype:
    """--kv-cache-dtype: the model's dtype, or float8 e4m3 where the device has it (the CPU,
    and GPUs of compute capability 8.9 or more: Ada, Hopper and later)."""
    if config.kv_cache_dtype == "auto":
        return dtype
    require_fp8(device, f"--kv-cache-dtype {config.kv_cache_dtype}")
    return torch.float8_e4m3fn


def require_fp8(device: torch.device, what: str) -> None:
    """fp8 runs on the CPU and on GPUs of compute capability 8.9 or more (Ada, Hopper): refused
    at start elsewhere, not at the first step."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"{what}: this GPU (compute capability {capability[0]}."
                             f"{capability[1]}) has no fp8 support; it needs 8.9 or more "
                             "(Ada, Hopper)")


def build_runner(config: EngineConfig, model_dir: Path, device: torch.device,
                 tp: TensorParallel | None = None) -> ModelRunner:
    """The model (this rank's shard of it when tp is given) loaded into a model runner, with
    its adapter slots (before the KV cache is sized: they come out of its budget)."""
    model_config = ModelConfig.from_dir(model_dir).with_rope_override(
        config.rope_scaling, config.rope_factor)
    dtype = choose_dtype(config, model_config, device)
    layout = ShardLayout(tp.rank, tp.world_size, model_config) if tp is not None else None
    model, kv_scales = load_model(config, model_config, model_dir, device, dtype, tp, layout)
    runner = ModelRunner(model, model_config, device, dtype, config.block_size,
                         model_config.eos_token_ids, config.watermark_gamma,
                         config.watermark_delta, kv_cache_dtype(config, dtype, device))
    if kv_scales and runner.kv_cache_dtype == dtype:
        logger.info("[textgen] the checkpoint's KV-cache scales are not used: the KV cache is "
                    "%s (--kv-cache-dtype fp8 uses them)", dtype)
    elif kv_scales:
        apply_kv_scales(model, kv_scales)
    runner.adapter_slots = adapter_slots(config, model, device, dtype, layout)
    if runner.adapter_slots is not None:
        runner.lora_batch = runner.adapter_slots.batch
        if tp is not None and tp.rank > 0:
            runner.adapter_loads = WorkerAdapterLoads(
                runner.adapter_slots, AdapterCatalog(config, model_config).load, tp.rank)
    return runner


def adapter_slots(config: EngineConfig, model, device: torch.device, dtype: torch.dtype,
                  layout: ShardLayout | None) -> AdapterSlots | None:
    """--max-active-adapters slots of --max-lora-rank on the model's projections (as this rank
    holds them), as many as --adapter-memory-fraction of the device holds; None with
    --max-lora-rank 0."""
    c = config
    if c.max_lora_rank == 0:
        return None
    targets = model_class(model.config).projection_targets(model.config)
    per_slot = bytes_per_slot(model.config, targets, c.max_lora_rank, dtype)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    num_slots = min(c.max_active_adapters, int(c.adapter_memory_fraction * memory // per_slot))
    if num_slots < 1:
        raise ValueError(f"adapter_memory_fraction {c.adapter_memory_fraction} holds no "
                         f"adapter slot of max_lora_rank {c.max_lora_rank} "
                         f"({per_slot / 2**30:.2f} GiB): raise it or lower max_lora_rank")
    logger.info("[textgen] %d adapter slots of rank %d (%.2f GiB each)", num_slots,
                c.max_lora_rank, per_slot / 2**30)
    return AdapterSlots(model, targets, num_slots, c.max_lora_rank,
                        model.layers[0].self_attn.attn.ops, dtype, device, layout)


def check_shardable(config: EngineConfig, model_config: ModelConfig, model_dir: Path,
                     shards: int, device: torch.device) -> None:
    """A model tensor parallelism cannot split, or more shards than GPUs, is refused before
    any worker starts."""
    if device.type == "cuda":
        first = device.index or 0
        if first + shards > torch.cuda.device_count():
            raise ValueError(f"--num-shard {shards}: {torch.cuda.device_count() - first} GPUs "
                             "visible from this one on (CUDA_VISIBLE_DEVICES chooses them)")
    on_the_fly = (config.quantize in ON_THE_FLY
                  or read_decoded_checkpoint(model_dir) is not None)
    quant = None if on_the_fly else resolve_quant_config(model_dir, config.quantize,
                                                         config.load_format)
    for rank in range(shards):  # heads, MLP columns and groups split evenly
        ShardLayout(rank, shards, model_config, quant)


def load_model(config: EngineConfig, model_config: ModelConfig, model_dir: Path,
               device: torch.device, dtype: torch.dtype, tp: TensorParallel | None = None,
               layout: ShardLayout | None = None
               ) -> tuple[torch.nn.Module, dict[int, dict[str, float]]]:
    """The checkpoint's weights in our model: quantized ones as they are, dense ones quantized
    now if --quantize asks; with tp, this rank's shard as layout says (parallel/layout.py).
    Also returns the checkpoint's KV-cache scales by layer (quantization/kv_scales.py)."""
    ops = select_ops(device, config.disable_custom_kernels)
    on_the_fly = config.quantize if config.quantize in ON_THE_FLY else None
    decoded = read_decoded_checkpoint(model_dir)
    if decoded is not None:  # fp8 or bitsandbytes-saved: served as that scheme
        if config.quantize not in (None, decoded.scheme):
            raise ValueError(f"--quantize {config.quantize}, but {model_dir} holds "
                             f"{decoded.description} weights: serve it with --quantize "
                             f"{decoded.scheme} or without the flag")
        logger.info("[textgen] the checkpoint holds %s weights: serving it as --quantize %s",
                    decoded.description, decoded.scheme)
        on_the_fly = decoded.scheme
    if on_the_fly == "fp8":
        require_fp8(device, "--quantize fp8" if decoded is None
                    else f"this {decoded.description} checkpoint")
    quant = None if decoded else resolve_quant_config(
        model_dir, None if on_the_fly else config.quantize, config.load_format)
    if on_the_fly and quant is not None:
        raise ValueError(f"--quantize {on_the_fly} quantizes a dense checkpoint while loading "
                         f"it, but {model_dir} is already {quant.method}-quantized (serve it "
                         f"with --quantize {quant.method})")
    if layout is not None:
        layout = dataclasses.replace(layout, quant=quant)
        model_config = layout.local_config
    if quant is not None:
        logger.info("[textgen] %s: %d bits, group_size %d, desc_act %s, format %s",
                    quant.method, quant.bits, quant.group_size, quant.desc_act,
                    quant.checkpoint_format)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(model_config, ops, quant, tp)
    finally:
        torch.set_default_dtype(previous)
    kv_scales: dict[int, dict[str, float]] = {}
    if config.load_format != "dummy":
        weights_dir = Path(config.weights_cache_override or model_dir)
        weights = iterate_weights(weights_dir, config.load_format)
        if decoded is not None:
            weights = decoded.decode(weights)
        weights = take_kv_scales(weights, kv_scales)
        model.load_weights(weights if layout is None else layout.shard_weights(weights))
    if on_the_fly:
        quantize_projections(model, on_the_fly, ops)
    return model.eval(), kv_scales
