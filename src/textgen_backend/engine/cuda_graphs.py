"""CUDA graphs of the forward pass (embedding to logits): decode steps by batch size, short
prefills by token count. A step replays the smallest graph that holds it, its inputs filled by
one host-to-device copy into the graph's static int32 buffer; padding tokens have slot -1
(nothing stored) and padding sequences context length 0 (nothing read).

Replaying removes the ~320 Python kernel launches of an eager step, which cost more than the
GPU work itself for decodes and for prefills of a few hundred tokens (time to first token).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from textgen_backend.layers.attention import AttentionMetadata
from textgen_backend.layers.lora import LoraBatch

logger = logging.getLogger("textgen")

# Prompts per prefill graph: enough for the prefills of a lightly loaded server (one or a few
# new requests per step); under load, prefills are long enough to be GPU-bound eagerly.
PREFILL_GRAPH_MAX_SEQS = 8


@dataclass
class StepArrays:
    """A step's integer inputs on the host: the new tokens packed back to back (a decode step
    has one per sequence), and each sequence's context length and cache blocks."""
    ids: list[int]
    positions: np.ndarray
    slots: np.ndarray
    context_lens: list[int]
    cu_seqlens: np.ndarray        # [batch + 1] token offsets of the sequences
    block_ids: list[list[int]]
    lora_slots: np.ndarray | None = None  # each token's adapter slot (-1: none); None: no adapter


class _GraphSet:
    """Graphs captured over one static input buffer, one per size (largest first, so that the
    shared memory pool fits the smaller ones)."""

    def __init__(self, sizes: tuple[int, ...], buffer_len: int, device: torch.device,
                 pool) -> None:
        self.sizes = sorted(sizes)
        self.inputs = torch.zeros(buffer_len, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = pool

    def capture(self, forward, prepare) -> None:
        """prepare(size) fills the buffer with a valid padding-only step; forward(size) runs."""
        with torch.inference_mode():
            for size in reversed(self.sizes):
                prepare(size)
                forward(size)                  # warm-up (Triton compiles here)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.logits[size] = forward(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()

    def smallest(self, need: int) -> int:
        return next(s for s in self.sizes if s >= need)

    def replay(self, size: int, host: torch.Tensor, rows: int) -> torch.Tensor:
        self.inputs[:len(host)].copy_(host, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:rows]


def fill_block_tables(tables: np.ndarray, block_ids: list[list[int]]) -> None:
    """Row i of a zeroed [batch, width] table gets sequence i's block ids."""
    for row, ids in enumerate(block_ids):
        tables[row, :len(ids)] = ids


def _fill(arrays: StepArrays, ids, positions, slots, context_lens, tables) -> None:
    """Writes a step into the parts of a zeroed host buffer: token slots past the step's tokens
    are padding (-1, nothing stored), sequence rows past its sequences read nothing (length 0)."""
    num_tokens, batch = len(arrays.ids), len(arrays.context_lens)
    ids[:num_tokens] = arrays.ids
    positions[:num_tokens] = arrays.positions
    slots[:num_tokens] = arrays.slots
    slots[num_tokens:] = -1
    context_lens[:batch] = arrays.context_lens
    fill_block_tables(tables, arrays.block_ids)


class DecodeGraphs:
    """Decode graphs by batch size; buffer [ids | positions | slots | context_lens | tables],
    then, in the graphs of steps with adapters (lora given), each row's adapter slot."""

    def __init__(self, model: nn.Module, batch_sizes: tuple[int, ...], table_width: int,
                 device: torch.device, pool, lora: LoraBatch | None = None) -> None:
        self.model = model
        self.table_width = table_width
        self.lora = lora
        largest = max(batch_sizes)
        self.set = _GraphSet(batch_sizes, self._buffer_len(largest), device, pool)
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.set.capture(self._forward, self._prepare)
        logger.info("[textgen] captured decode CUDA graphs%s for batch sizes %s",
                    " with adapters" if lora else "", self.set.sizes)

    def fits(self, batch: int) -> bool:
        return batch <= self.set.sizes[-1]

    def _buffer_len(self, size: int) -> int:
        return size * (4 + self.table_width + (self.lora is not None))

    def _prepare(self, size: int) -> None:
        parts = self._split(size, self.set.inputs)
        parts[2].fill_(-1)
        if self.lora is not None:
            parts[5].fill_(-1)

    def _split(self, size: int, buffer):
        """(ids, positions, slots, context_lens, tables[, adapter slots]) of the graph for
        `size` sequences."""
        sizes = [size, size, size, size, size * self.table_width] + [size] * (self.lora is not None)
        parts = list(buffer[:self._buffer_len(size)].split(sizes))
        parts[4] = parts[4].reshape(size, self.table_width)
        return parts

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, context_lens, tables, *adapter_slots = self._split(
            size, self.set.inputs)
        meta = AttentionMetadata(is_decode=True, slot_mapping=slots, context_lens=context_lens,
                                 block_tables=tables, cu_seqlens_q=self.cu_seqlens[:size + 1],
                                 max_seqlen_q=1)
        if self.lora is None:
            return self.model.compute_logits(self.model(ids, positions, meta))
        self.lora.slot_of_token = adapter_slots[0]
        try:
            return self.model.compute_logits(self.model(ids, positions, meta))
        finally:
            self.lora.slot_of_token = None

    def run(self, arrays: StepArrays, pinned) -> torch.Tensor:
        """Replays the smallest graph holding the batch; pinned(n) gives a host buffer."""
        batch = len(arrays.ids)
        size = self.set.smallest(batch)
        buffer = pinned(self._buffer_len(size))
        buffer.zero_()
        parts = [part.numpy() for part in self._split(size, buffer)]
        _fill(arrays, *parts[:5])
        if self.lora is not None:
            parts[5][:batch] = arrays.lora_slots
            parts[5][batch:] = -1
        return self.set.replay(size, buffer, batch)


class PrefillGraphs:
    """Prefill graphs by token count, each for up to PREFILL_GRAPH_MAX_SEQS prompts; buffer
    [ids | positions | slots (T each) | context_lens (S) | cu_seqlens (S + 1) | tables (S x W)].
    Padding tokens follow the last prompt and belong to none (the attention kernel reads the
    prompts' extents from cu_seqlens, which repeats the total for padding sequences)."""

    def __init__(self, model: nn.Module, token_counts: tuple[int, ...], table_width: int,
                 device: torch.device, pool) -> None:
        self.model = model
        self.table_width = table_width
        self.max_seqs = PREFILL_GRAPH_MAX_SEQS
        self.set = _GraphSet(token_counts, self._buffer_len(max(token_counts)), device, pool)
        self.set.capture(self._forward, self._prepare)
        logger.info("[textgen] captured prefill CUDA graphs for %s tokens", self.set.sizes)

    def fits(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens <= self.set.sizes[-1] and num_seqs <= self.max_seqs

    def _buffer_len(self, tokens: int) -> int:
        s = self.max_seqs
        return 3 * tokens + s + (s + 1) + s * self.table_width

    def _split(self, tokens: int, buffer):
        s = self.max_seqs
        ids, positions, slots, context_lens, cu_seqlens, tables = buffer[
            :self._buffer_len(tokens)].split([tokens, tokens, tokens, s, s + 1,
                                              s * self.table_width])
        return ids, positions, slots, context_lens, cu_seqlens, tables.reshape(
            s, self.table_width)

    def _prepare(self, tokens: int) -> None:
        self.set.inputs.zero_()
        self._split(tokens, self.set.inputs)[2].fill_(-1)

    def _forward(self, tokens: int) -> torch.Tensor:
        ids, positions, slots, context_lens, cu_seqlens, tables = self._split(tokens,
                                                                             self.set.inputs)
        meta = AttentionMetadata(is_decode=False, slot_mapping=slots, context_lens=context_lens,
                                 block_tables=tables, cu_seqlens_q=cu_seqlens,
                                 max_seqlen_q=tokens)
        hidden = self.model(ids, positions, meta)
        # a padding sequence's "last token" is the last real one: its logits are sliced off
        return self.model.compute_logits(hidden[(cu_seqlens[1:] - 1).clamp(min=0)])

    def run(self, arrays: StepArrays, pinned) -> torch.Tensor:
        num_tokens, batch = len(arrays.ids), len(arrays.context_lens)
        size = self.set.smallest(num_tokens)
        buffer = pinned(self._buffer_len(size))
        buffer.zero_()
        ids, positions, slots, context_lens, cu_seqlens, tables = (
            part.numpy() for part in self._split(size, buffer))
        _fill(arrays, ids, positions, slots, context_lens, tables)
        cu_seqlens[:batch + 1] = arrays.cu_seqlens
        cu_seqlens[batch + 1:] = num_tokens
        return self.set.replay(size, buffer, batch)
