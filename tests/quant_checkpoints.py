"""The tests' own GPTQ / AWQ packer: round-to-nearest quantization of a model's projections,
packed as AutoGPTQ / GPTQModel / AutoAWQ write checkpoints, and the dense dequantized twin that
transformers runs as the reference. Written independently of textgen_backend.weights.quantization
(numpy uint32 words, explicit loops), so that a shared misreading of a format cannot cancel out.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# (checkpoint projection, the input it reads): projections that read one input share an
# act-order permutation, as GPTQ derives it from that input's statistics.
PROJECTIONS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column AWQ_ORDER[i]


@dataclass
class Quantized:
    q: np.ndarray          # [K, N] quantized values
    zero: np.ndarray       # [G, N] true zero points: w = (q - zero) * scale
    scale: torch.Tensor    # [G, N] float16
    g_idx: np.ndarray      # [K] group of each input


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, perm: np.ndarray | None,
                 min_zero: int = 0) -> Quantized:
    """w [N, K] -> round-to-nearest with one scale / zero per (group, output). perm: act-order,
    group i holds inputs perm[i * group_size:(i + 1) * group_size] (g_idx[perm[j]] = j // gs)."""
    n, k = w.shape
    group_size = k if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    order = np.arange(k) if perm is None else perm
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order] = np.arange(k) // group_size
    groups = -(-k // group_size)
    wt = w.double().numpy().T  # [K, N]
    q = np.zeros((k, n), dtype=np.int64)
    zero = np.zeros((groups, n), dtype=np.int64)
    scale = np.zeros((groups, n), dtype=np.float16)
    for g in range(groups):
        rows = np.nonzero(g_idx == g)[0]
        lo, hi = wt[rows].min(axis=0), wt[rows].max(axis=0)
        if sym:
            s = 2 * np.maximum(-lo, hi) / maxq
            z = np.full(n, (maxq + 1) // 2)
        else:
            s = (hi - lo) / maxq
            z = np.clip(np.round(-lo / s), min_zero, maxq).astype(np.int64)
        s16 = s.astype(np.float16)
        scale[g], zero[g] = s16, z
        q[rows] = np.clip(np.round(wt[rows] / s16.astype(np.float64)) + z, 0, maxq)
    return Quantized(q, zero, torch.from_numpy(scale), g_idx)


def dequantize(qz: Quantized) -> torch.Tensor:
    """[N, K] float32: (q - zero[g_idx]) * scale[g_idx]."""
    q = torch.from_numpy(qz.q).float()
    g = torch.from_numpy(qz.g_idx).long()
    zero = torch.from_numpy(qz.zero).float()
    return ((q - zero[g]) * qz.scale.float()[g]).t().contiguous()


def _words(values: np.ndarray, bits: int) -> np.ndarray:
    """[..., PACK] values -> [...] int32 words, value i at bits [i * bits, (i + 1) * bits)."""
    word = np.zeros(values.shape[:-1], dtype=np.uint32)
    for i in range(values.shape[-1]):
        word |= (values[..., i].astype(np.uint32) & np.uint32((1 << bits) - 1)) << np.uint32(bits * i)
    return word.view(np.int32)


def pack_gptq(qz: Quantized, bits: int, checkpoint_format: str) -> dict[str, torch.Tensor]:
    pack = 32 // bits
    k, n = qz.q.shape
    qweight = _words(qz.q.reshape(k // pack, pack, n).transpose(0, 2, 1), bits)  # along K
    stored = qz.zero - 1 if checkpoint_format == "gptq" else qz.zero  # v1 stores z - 1
    qzeros = _words(stored.reshape(stored.shape[0], n // pack, pack), bits)  # along N
    return {"qweight": torch.from_numpy(np.ascontiguousarray(qweight)),
            "qzeros": torch.from_numpy(np.ascontiguousarray(qzeros)),
            "scales": qz.scale.clone(), "g_idx": torch.from_numpy(qz.g_idx.copy())}


def pack_awq(qz: Quantized) -> dict[str, torch.Tensor]:
    k, n = qz.q.shape

    def along_n(values):  # [R, N] -> [R, N / 8], nibble i = column 8c + AWQ_ORDER[i]
        return _words(values.reshape(values.shape[0], n // 8, 8)[:, :, AWQ_ORDER], 4)

    return {"qweight": torch.from_numpy(np.ascontiguousarray(along_n(qz.q))),
            "qzeros": torch.from_numpy(np.ascontiguousarray(along_n(qz.zero))),
            "scales": qz.scale.clone()}


def write_quantized(model_dir: Path, out_dir: Path, method: str, bits: int = 4,
                    group_size: int = 32, sym: bool = False, desc_act: bool = False,
                    checkpoint_format: str = "gptq", config_file: str = "config.json",
                    seed: int = 0) -> tuple[Path, Path]:
    """Quantizes the projections of the HF model in model_dir. Returns (quantized checkpoint
    directory, directory of the dense dequantized twin for transformers)."""
    rng = np.random.default_rng(seed)
    quant_dir, ref_dir = out_dir / f"{method}-quantized", out_dir / f"{method}-reference"
    for d in (quant_dir, ref_dir):
        d.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, d / f.name)
    dense = load_file(str(model_dir / "model.safetensors"))
    quantized, reference, perms = {}, {}, {}
    for name, tensor in dense.items():
        layer, _, kind = name.rpartition(".")
        proj = layer.rsplit(".", 1)[-1]
        if proj not in PROJECTIONS or kind != "weight":
            quantized[name] = reference[name] = tensor
            continue
        perm = None
        if desc_act:
            key = (layer.rsplit(".", 2)[0], PROJECTIONS[proj])
            perm = perms.setdefault(key, rng.permutation(tensor.shape[1]))
        # v1 cannot store a zero point of 0 (it would read back as 2**bits): quantizers keep z >= 1
        qz = quantize_rtn(tensor, bits, group_size, sym, perm,
                          min_zero=1 if (method, checkpoint_format) == ("gptq", "gptq") else 0)
        packed = pack_awq(qz) if method == "awq" else pack_gptq(qz, bits, checkpoint_format)
        quantized.update({f"{layer}.{part}": t for part, t in packed.items()})
        reference[name] = dequantize(qz)
    save_file(quantized, str(quant_dir / "model.safetensors"))
    save_file(reference, str(ref_dir / "model.safetensors"))
    if method == "awq":
        qconfig = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                   "zero_point": True, "version": "gemm"}
    else:
        qconfig = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                   "desc_act": desc_act, "sym": sym, "checkpoint_format": checkpoint_format}
    if config_file == "config.json":
        config = json.loads((quant_dir / "config.json").read_text())
        config["quantization_config"] = qconfig
        (quant_dir / "config.json").write_text(json.dumps(config))
    else:
        (quant_dir / config_file).write_text(json.dumps(qconfig))
    return quant_dir, ref_dir
