"""Device memory for resident adapters: a fixed number of slots, each as large as one adapter of
--max-lora-rank on every projection. Fixed slots keep every tensor's address for the life of
the server, so CUDA graphs captured once serve any later mix of adapters."""
from __future__ import annotations

import torch
from torch import nn

from textgen_backend.adapters.peft_format import AdapterWeights
from textgen_backend.layers.lora import LoraBatch, LoraProjection
from textgen_backend.layers.ops import Ops
from textgen_backend.models.config import ModelConfig
from textgen_backend.models.llama import ProjectionTarget
from textgen_backend.parallel.layout import ShardLayout
from textgen_kernels.lora import compile_token_counts


def _projections(targets: dict[str, ProjectionTarget]) -> dict[str, tuple[int, int, int]]:
    """Our projection module (under a layer) -> (in features, out features, shards)."""
    modules: dict[str, tuple[int, int, int]] = {}
    for t in targets.values():
        width, out, shards = modules.get(t.module, (t.in_features, 0, 0))
        modules[t.module] = (width, max(out, t.offset + t.size), max(shards, t.shard + 1))
    return modules


def _shard_starts(targets: dict[str, ProjectionTarget], module: str) -> tuple[int, ...]:
    """A module's shards' first output columns (0 alone for an unfused projection)."""
    return tuple(sorted({t.offset for t in targets.values() if t.module == module}))


def bytes_per_slot(model_config: ModelConfig, targets: dict[str, ProjectionTarget],
                   max_rank: int, dtype: torch.dtype) -> int:
    per_layer = sum(shards * max_rank * (width + out)
                    for width, out, shards in _projections(targets).values())
    return per_layer * model_config.num_layers * dtype.itemsize


class AdapterSlots:
    def __init__(self, model: nn.Module, targets: dict[str, ProjectionTarget], num_slots: int,
                 max_rank: int, ops: Ops, dtype: torch.dtype, device: torch.device,
                 layout: ShardLayout | None = None):
        """Wraps each layer's projections in a LoraProjection (after the weights are loaded:
        the checkpoint's names do not know the wrapper). targets: the model's as built (a
        tensor-parallel rank's share; layout then cuts each adapter to it)."""
        self.num_slots, self.max_rank, self.device = num_slots, max_rank, device
        self.targets, self.layout = targets, layout
        # writes go on a stream of their own: the running batch never waits for them
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.batch = LoraBatch()
        self.projections: dict[str, LoraProjection] = {}
        for index, layer in enumerate(model.layers):
            for module, (_, _, shards) in _projections(targets).items():
                parent_name, _, leaf = module.rpartition(".")
                parent = layer.get_submodule(parent_name)
                wrapped = LoraProjection(getattr(parent, leaf), num_slots, shards * max_rank,
                                         _shard_starts(targets, module), ops, self.batch, dtype,
                                         device)
                setattr(parent, leaf, wrapped)
                self.projections[f"layers.{index}.{module}"] = wrapped
        # One slot's worth of host memory, pinned on a GPU, where an adapter is laid out as its
        # slot holds it before asynchronous copies move it: one pass over the weights on the
        # host, no synchronous copy per tensor and no zeroing kernels on the device.
        sizes = [n for p in self.projections.values()
                 for n in (p.a_slots[0].numel(), p.b_slots[0].numel())]
        self._staging = torch.empty(sum(sizes), dtype=dtype, pin_memory=device.type == "cuda")
        parts = self._staging.split(sizes)
        self._staged = {key: (parts[2 * i].view_as(p.a_slots[0]),
                              parts[2 * i + 1].view_as(p.b_slots[0]))
                        for i, (key, p) in enumerate(self.projections.items())}

    def compile_kernels(self, max_tokens: int) -> None:
        """Runs the kernels of each projection shape on rows of no adapter, at every token
        count that makes Triton compile a variant (decode graphs compile only their own), so
        that the first step of the first request with an adapter, which every running
        stream waits for, compiles nothing (the first H100 run saw a 1.1 s step)."""
        shapes = {(p.in_features, p.out_features, p.shard_starts): p
                  for p in self.projections.values()}
        dtype = self._staging.dtype
        counts = compile_token_counts(max_tokens, sorted({(p.in_features, p.a_slots.shape[1])
                                                          for p in shapes.values()}))
        slots = torch.full((counts[-1],), -1, dtype=torch.int32, device=self.device)
        for projection in shapes.values():
            x = torch.zeros(counts[-1], projection.in_features, dtype=dtype, device=self.device)
            out = torch.zeros(counts[-1], projection.out_features, dtype=dtype,
                              device=self.device)
            for count in counts:
                projection.add_deltas(out[:count], x[:count], slots[:count])

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Fills a free slot (the forward never reads it meanwhile: no running sequence uses
        it); the scaling goes into B, computed in float32 and rounded once. Shard i of a fused
        projection takes ranks [i * R, i * R + r). One caller at a time (the loader thread);
        returns once the slot is written."""
        shared = set()
        self._staging.zero_()
        r_max = self.max_rank
        for (layer, name), piece in adapter.pieces.items():
            target = self.targets[name]
            a, b = piece.a, piece.b
            if self.layout is not None:
                a, b = self.layout.shard_lora(name, a, b)
            key = f"layers.{layer}.{target.module}"
            a_staged, b_staged = self._staged[key]
            start, r = target.shard * r_max, piece.rank
            rows = slice(target.offset, target.offset + target.size)
            a_staged[start:start + r].copy_(a)
            torch.mul(b.float(), piece.scaling, out=b_staged[rows, start:start + r])
            if target.size == self.projections[key].out_features:  # ranks for every shard
                shared.add(key)
        if self._stream is None:
            self._copy(slot, shared)
            return
        with torch.cuda.stream(self._stream):
            self._copy(slot, shared)
        self._stream.synchronize()  # the staging memory is rewritten by the next write

    def _copy(self, slot: int, shared: set[str]) -> None:
        for key, projection in self.projections.items():
            a_staged, b_staged = self._staged[key]
            projection.a_slots[slot].copy_(a_staged, non_blocking=True)
            projection.b_slots[slot].copy_(b_staged, non_blocking=True)
            projection.shared_ranks[slot] = int(key in shared)
