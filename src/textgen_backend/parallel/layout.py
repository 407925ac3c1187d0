"""Which part of every weight a tensor-parallel rank holds (Megatron's split).

Column-parallel (q/k/v, gate/up): each rank holds some output rows, so attention heads and MLP
columns are split and a rank attends with its own heads. Row-parallel (o, down): each rank
holds the matching input columns; their partial outputs are summed by one all-reduce. KV heads
are split too, or replicated when there are fewer than ranks (each rank keeps the one its query
heads use). Embedding and lm_head are split along the vocabulary, padded to equal parts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from textgen_backend.models.config import ModelConfig
from textgen_backend.weights.quantization import QUANT_TENSORS, QuantConfig

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ShardLayout:
    rank: int
    world_size: int
    config: ModelConfig   # the whole model's
    quant: QuantConfig | None = None  # a GPTQ / AWQ checkpoint's

    def __post_init__(self):
        c, w = self.config, self.world_size
        checks = [("num_attention_heads", c.num_heads, c.num_heads % w == 0),
                  ("intermediate_size", c.intermediate_size, c.intermediate_size % w == 0),
                  ("num_key_value_heads", c.num_kv_heads,
                   c.num_kv_heads % w == 0 or w % c.num_kv_heads == 0)]
        for name, value, ok in checks:
            if not ok:
                raise ValueError(f"--num-shard {w}: the model's {name} ({value}) does not split "
                                 f"evenly over {w} shards")
        if self.quant is not None:
            self._check_quantized_split()

    def _check_quantized_split(self) -> None:
        """Packed words and groups must not straddle two ranks (act-order's groups do)."""
        q, w = self.quant, self.world_size
        if q.desc_act:
            raise ValueError(f"--num-shard {w}: GPTQ act-order (desc_act) checkpoints are not "
                             "sharded yet")
        c = self.config
        for projection, width in (("o_proj", c.num_heads * c.head_dim),
                                  ("down_proj", c.intermediate_size)):
            rows = self._rows(projection)
            size = q.group_size_for(width)
            if rows.start % size and rows.start // size != (rows.stop - 1) // size:
                raise ValueError(f"--num-shard {w}: {projection}'s {width} inputs split into "
                                 f"parts of {rows.stop - rows.start}, across {q.method} "
                                 f"groups of {size}")
        for projection in _COLUMN:
            rows = self._rows(projection)
            if (rows.stop - rows.start) % q.pack:
                raise ValueError(f"--num-shard {w}: {projection}'s part of "
                                 f"{rows.stop - rows.start} outputs is not a whole number of "
                                 f"{q.bits}-bit words ({q.pack} values)")

    @property
    def local_config(self) -> ModelConfig:
        """The model as one rank builds it: its heads and MLP columns (the vocabulary split
        is the embedding's and lm_head's own business)."""
        c, w = self.config, self.world_size
        return dataclasses.replace(c, num_heads=c.num_heads // w,
                                   num_kv_heads=max(1, c.num_kv_heads // w),
                                   intermediate_size=c.intermediate_size // w)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.world_size)

    def _heads(self, first_head: int, count: int) -> slice:
        d = self.config.head_dim
        return slice(first_head * d, (first_head + count) * d)

    def _rows(self, projection: str) -> slice:
        """The output rows (of a column-parallel projection) or input columns (of a
        row-parallel one) this rank holds."""
        c, r, w = self.config, self.rank, self.world_size
        if projection in ("q_proj", "o_proj"):
            per_rank = c.num_heads // w
            return self._heads(r * per_rank, per_rank)
        if projection in ("k_proj", "v_proj"):
            if c.num_kv_heads >= w:
                per_rank = c.num_kv_heads // w
                return self._heads(r * per_rank, per_rank)
            return self._heads(r * c.num_kv_heads // w, 1)  # the head of this rank's q heads
        per_rank = c.intermediate_size // w
        return slice(r * per_rank, (r + 1) * per_rank)

    def shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (Hugging Face names, "model." stripped)."""
        parts = name.split(".")
        projection = parts[-2] if len(parts) >= 2 else ""
        if parts[-1] in QUANT_TENSORS and self.quant is not None:
            return self._shard_quantized(projection, parts[-1], tensor)
        if projection in _COLUMN:
            return tensor[self._rows(projection)]
        if projection in ("qkv_proj", "gate_up_proj"):  # a checkpoint that fused them already
            return self._shard_fused(projection, tensor)
        if projection in _ROW:
            if parts[-1] == "bias":  # added once: by rank 0
                return tensor if self.rank == 0 else torch.zeros_like(tensor)
            return tensor[:, self._rows(projection)]
        if name in _VOCAB:
            per_rank = self.vocab_per_rank
            part = tensor[self.rank * per_rank:(self.rank + 1) * per_rank]
            if len(part) < per_rank:  # the last rank's padding rows: never looked up or sampled
                part = torch.cat([part, part.new_zeros(per_rank - len(part), *part.shape[1:])])
            return part
        return tensor  # norms: every rank holds them whole

    def _shard_quantized(self, projection: str, part: str, tensor: torch.Tensor) -> torch.Tensor:
        """A GPTQ / AWQ tensor's part: qweight [K / pack, N] (GPTQ) or [K, N / pack] (AWQ),
        qzeros [G, N / pack], scales [G, N], g_idx [K] (GPTQ)."""
        q = self.quant
        if projection in _COLUMN:  # output columns
            cols = self._rows(projection)
            packed = slice(cols.start // q.pack, cols.stop // q.pack)
            if part == "g_idx":
                return tensor
            if part == "qzeros" or (part == "qweight" and q.method == "awq"):
                return tensor[:, packed]
            return tensor[:, cols]
        if projection not in _ROW:
            raise ValueError(f"quantized tensor of {projection!r}: no tensor-parallel split")
        rows = self._rows(projection)  # input rows
        if part == "qweight":
            if q.method == "awq":
                return tensor[rows]
            return tensor[rows.start // q.pack:rows.stop // q.pack]
        width = (self.config.num_heads * self.config.head_dim if projection == "o_proj"
                 else self.config.intermediate_size)
        size = q.group_size_for(width)
        first_group = rows.start // size
        if part == "g_idx":  # without act-order: each row's group, renumbered from 0
            return tensor[rows] - first_group
        return tensor[first_group:(rows.stop - 1) // size + 1]

    def _shard_fused(self, projection: str, tensor: torch.Tensor) -> torch.Tensor:
        c = self.config
        if projection == "qkv_proj":
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            pieces = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]))
        else:
            pieces = zip(("gate_proj", "up_proj"), tensor.split(c.intermediate_size))
        return torch.cat([piece[self._rows(name)] for name, piece in pieces])

    def shard_lora(self, projection: str, a: torch.Tensor, b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a LoRA on `projection` (delta = B @ A, a [r, in], b [out, r]):
        a column-parallel projection's B rows, a row-parallel one's A columns (the partial
        deltas join the projection's all-reduce), like the projection's own weight."""
        weight = f"layers.0.x.{projection}.weight"
        if projection in _ROW:
            return self.shard(weight, a), b
        return a, self.shard(weight, b)

    def shard_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            yield name, self.shard(name.removeprefix("model."), tensor)
