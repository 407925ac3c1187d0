"""GPTQ and AWQ checkpoints: their quantization configs, their packed tensors, and the
conversion into the one layout our kernels read (see textgen_kernels.quant_matmul).

Formats (per linear layer, K inputs, N outputs, G = cdiv(K, group_size) groups, PACK = 32 // bits):
- GPTQ: qweight int32 [K / PACK, N], packed along K (row k = r * PACK + i at bits i * bits of
  word r); qzeros int32 [G, N / PACK], packed along N in natural order; scales [G, N]; g_idx
  int32 [K], the group of each input (act-order / desc_act permutes it). Zero points follow
  checkpoint_format: "gptq" (v1) stores z - 1, so w = (q - (qzero + 1)) * scale, with qzero
  read unmasked (a stored 15 means 16, as AutoGPTQ's kernels read it); "gptq_v2" stores z,
  w = (q - qzero) * scale.
- AWQ (GEMM): qweight int32 [K, N / 8] and qzeros int32 [G, N / 8], both packed along N with
  value i of a word holding column AWQ_PACK_ORDER[i] of its 8; scales [G, N];
  w = (q - qzero) * scale; 4 bits, no g_idx.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("textgen")

QUANT_METHODS = ("gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# the per-layer tensors of a quantized checkpoint, by name suffix
QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class QuantConfig:
    method: str                    # "gptq" or "awq"
    bits: int = 4
    group_size: int = 128          # -1: one group over all inputs
    desc_act: bool = False         # act-order (GPTQ): g_idx permutes the inputs
    sym: bool = True
    checkpoint_format: str = "gptq"  # GPTQ zero-point convention; "awq_gemm" for AWQ

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise ValueError(f"quantization method must be one of {', '.join(QUANT_METHODS)}, "
                             f"got {self.method!r}")
        allowed_bits = (4, 8) if self.method == "gptq" else (4,)
        if self.bits not in allowed_bits:
            raise ValueError(f"{self.method} bits must be one of {allowed_bits}, got {self.bits}")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size % 16):
            raise ValueError(f"group_size must be -1 or a positive multiple of 16, got "
                             f"{self.group_size}")
        formats = GPTQ_FORMATS if self.method == "gptq" else ("awq_gemm",)
        if self.checkpoint_format not in formats:
            raise ValueError(f"{self.method} checkpoint_format must be one of "
                             f"{', '.join(formats)}, got {self.checkpoint_format!r}")

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def default(cls, method: str) -> QuantConfig:
        """4 bits, groups of 128, symmetric: the weights of --load-format dummy."""
        return cls(method, checkpoint_format="gptq" if method == "gptq" else "awq_gemm")

    @classmethod
    def from_dict(cls, raw: dict, source: str, method: str | None = None) -> QuantConfig:
        """From a checkpoint's quantization_config (config.json), quantize_config.json
        (AutoGPTQ) or quant_config.json (AutoAWQ); `method` when the file does not say."""
        method = str(raw.get("quant_method") or method or "").lower()
        if method not in QUANT_METHODS:
            raise ValueError(f"{source}: quantization method {method or 'unknown'!r} is not "
                             f"supported (supported: {', '.join(QUANT_METHODS)})")
        bits = int(raw.get("bits", raw.get("w_bit", 4)))
        group_size = int(raw.get("group_size", raw.get("q_group_size", 128)))
        if method == "awq":
            version = str(raw.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"{source}: AWQ version {version!r} is not supported (only "
                                 "the GEMM packing)")
            if not raw.get("zero_point", True):
                raise ValueError(f"{source}: AWQ without zero points is not supported")
            return cls("awq", bits, group_size, False, False, "awq_gemm")
        if raw.get("lm_head"):
            raise ValueError(f"{source}: a quantized lm_head is not supported")
        fmt = str(raw.get("checkpoint_format", "gptq")).lower()
        if fmt not in GPTQ_FORMATS:
            raise ValueError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported "
                             f"(supported: {', '.join(GPTQ_FORMATS)})")
        return cls("gptq", bits, group_size, bool(raw.get("desc_act", False)),
                   bool(raw.get("sym", True)), fmt)


def read_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The checkpoint's quantization: config.json's quantization_config, else
    quantize_config.json (GPTQ) or quant_config.json (AWQ); None when it has none."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config"):
        return QuantConfig.from_dict(config["quantization_config"], "config.json")
    for filename, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        if (model_dir / filename).exists():
            return QuantConfig.from_dict(json.loads((model_dir / filename).read_text()),
                                         filename, method)
    return None


def resolve_quant_config(model_dir: str | Path, quantize: str | None,
                         load_format: str = "safetensors") -> QuantConfig | None:
    """What --quantize and the checkpoint say together. Without the flag a GPTQ / AWQ
    checkpoint is still recognized (as TGI does); with it, the checkpoint must agree. Random
    weights (load_format dummy) without a quantization config get QuantConfig.default."""
    found = read_quant_config(model_dir)
    if quantize is None:
        if found is not None:
            logger.info("[textgen] the checkpoint is %s-quantized: serving it as --quantize %s",
                        found.method, found.method)
        return found
    if found is None:
        if load_format == "dummy":
            return QuantConfig.default(quantize)
        raise ValueError(f"--quantize {quantize}: {model_dir} has no quantization config "
                         "(quantization_config in config.json, quantize_config.json or "
                         "quant_config.json)")
    if found.method != quantize:
        raise ValueError(f"--quantize {quantize}, but the checkpoint is {found.method}-quantized")
    return found


# --- packing ---------------------------------------------------------------------------------

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, N] int32 -> [R * PACK, N] int32: row r * PACK + i is bits [i * bits, (i+1) * bits)
    of row r (GPTQ's qweight, our kernels' layout)."""
    pack = 32 // bits
    shifts = torch.arange(pack, dtype=torch.int64, device=packed.device) * bits
    values = (packed.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * pack, packed.shape[1]).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_rows: [K, N] values in [0, 2**bits) -> [K / PACK, N] int32."""
    pack = 32 // bits
    k, n = values.shape
    if k % pack:
        raise ValueError(f"{k} rows do not pack into words of {pack}")
    shifts = torch.arange(pack, dtype=torch.int64, device=values.device) * bits
    grouped = values.to(torch.int64).reshape(k // pack, pack, n)
    return _to_int32((grouped << shifts[None, :, None]).sum(dim=1))


def unpack_columns(packed: torch.Tensor, bits: int,
                   order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] int32 packed along columns -> [R, C * PACK] int32. Value i of word c is column
    c * PACK + order[i] (natural order: order[i] = i)."""
    pack = 32 // bits
    shifts = torch.arange(pack, dtype=torch.int64, device=packed.device) * bits
    values = (packed.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    if order is not None:  # values[..., i] belongs to column order[i]
        values = values[:, :, torch.argsort(torch.tensor(order))]
    return values.reshape(packed.shape[0], packed.shape[1] * pack).to(torch.int32)


@dataclass
class QuantShard:
    """One checkpoint layer (or one shard of a fused layer) decoded from its packed format."""
    qvalues: torch.Tensor          # [K, Ns] int32, quantized values in input-feature order
    zeros: torch.Tensor            # [G, Ns] float32: w = (q - zero) * scale
    scales: torch.Tensor           # [G, Ns] as stored
    g_idx: torch.Tensor | None     # [K] group of each input; None: k // group_size


def decode_checkpoint_layer(parts: dict[str, torch.Tensor], cfg: QuantConfig, in_features: int,
                            out_features: int, name: str) -> QuantShard:
    """qweight / qzeros / scales (/ g_idx) of one checkpoint layer -> QuantShard."""
    missing = [p for p in ("qweight", "scales") if p not in parts]
    if "qzeros" not in parts and not cfg.sym:
        missing.append("qzeros")
    if missing:
        raise ValueError(f"quantized layer {name!r} lacks {', '.join(missing)}")
    k, n, pack = in_features, out_features, cfg.pack
    groups = -(-k // cfg.group_size_for(k))
    qweight, scales = parts["qweight"], parts["scales"]

    def expect(tensor_name, tensor, shape, dtypes):
        if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
            raise ValueError(f"{name}.{tensor_name} must be {list(shape)} {dtypes[0]}, got "
                             f"{list(tensor.shape)} {tensor.dtype} ({cfg.method}, {cfg.bits} "
                             f"bits, group_size {cfg.group_size})")

    floats = (torch.float16, torch.bfloat16, torch.float32)
    expect("scales", scales, (groups, n), floats)
    if cfg.method == "gptq":
        expect("qweight", qweight, (k // pack, n), (torch.int32,))
        qvalues = unpack_rows(qweight, cfg.bits)
        if "qzeros" in parts:
            expect("qzeros", parts["qzeros"], (groups, n // pack), (torch.int32,))
            stored = unpack_columns(parts["qzeros"], cfg.bits).float()
            if cfg.checkpoint_format == "gptq":      # v1: stored z - 1
                zeros = stored + 1
            elif cfg.checkpoint_format == "gptq_v2":  # v2: stored z
                zeros = stored
            else:
                raise AssertionError(cfg.checkpoint_format)
        else:  # symmetric checkpoints may omit them
            zeros = torch.full((groups, n), float(1 << (cfg.bits - 1)))
        g_idx = parts.get("g_idx")
        if g_idx is not None:
            expect("g_idx", g_idx, (k,), (torch.int32, torch.int64))
    else:  # AWQ GEMM
        expect("qweight", qweight, (k, n // pack), (torch.int32,))
        expect("qzeros", parts["qzeros"], (groups, n // pack), (torch.int32,))
        qvalues = unpack_columns(qweight, cfg.bits, AWQ_PACK_ORDER)
        zeros = unpack_columns(parts["qzeros"], cfg.bits, AWQ_PACK_ORDER).float()
        g_idx = None
    return QuantShard(qvalues, zeros, scales, g_idx)


def act_order_permutation(g_idx: torch.Tensor | None, group_size: int,
                          in_features: int) -> torch.Tensor | None:
    """The row order that makes every group contiguous: perm with g_idx[perm] ==
    arange(K) // group_size (what GPTQ's act-order produces); None when it is the identity."""
    if g_idx is None:
        return None
    g_idx = g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    expected = torch.arange(in_features) // group_size
    if not torch.equal(g_idx[perm], expected):
        raise ValueError(f"g_idx must assign exactly group_size ({group_size}) inputs to each "
                         "group (as GPTQ's act-order does)")
    if torch.equal(perm, torch.arange(in_features)):
        return None
    return perm.to(torch.int32)
