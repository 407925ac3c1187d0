"""fp8 checkpoints in the formats people publish (quantization/fp8_checkpoint.py), written from
a dense tiny model: compressed-tensors' float-quantized (per-channel scales, llm-compressor's
FP8_DYNAMIC) and transformers' fine-grained fp8 (weight_scale_inv per 2-D block)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from textgen_backend.quantization import formats


def write_fp8_checkpoint(dense_dir: Path, out_dir: Path, fmt: str, block: int = 32) -> Path:
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(dense_dir, out_dir)
    tensors = {}
    for name, value in load_file(out_dir / "model.safetensors").items():
        if not (name.endswith("_proj.weight") and ".layers." in name):
            tensors[name] = value
        elif fmt == "compressed-tensors":
            q, scale = formats.quantize_fp8_rows(value)
            tensors[name], tensors[name.replace(".weight", ".weight_scale")] = q, scale[:, None]
        else:  # one scale per [block, block] tile, stored inverted as transformers does
            n, k = value.shape
            tiles = value.float().reshape(n // block, block, k // block, block)
            scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / formats.FP8_MAX
            full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
            tensors[name] = (value.float() / full).to(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale_inv")] = scale
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    if fmt == "compressed-tensors":
        float8 = {"num_bits": 8, "type": "float", "symmetric": True}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {**float8, "strategy": "channel", "dynamic": False},
                "input_activations": {**float8, "strategy": "token", "dynamic": True}}}}
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "weight_block_size": [block, block]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir
