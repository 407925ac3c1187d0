"""CUDA graphs of the forward pass (embedding to logits): decode steps by batch size, and
varlen steps by shape: prefills of short prompts, mixed steps (decode rows beside prompt
chunks) and speculative verification (each row's drafts). A step replays the smallest graph
that holds it, its inputs filled by one host-to-device copy into the graph's static int32
buffer; padding tokens have slot -1 (nothing stored) and padding sequences context length 0
(nothing read).

Replaying removes the ~320 Python kernel launches of an eager step (~1,000 for a mixed step),
which cost more than the GPU work itself for decodes, for prefills of a few hundred tokens
(time to first token) and for steps that verify a few drafts per row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from textgen_backend.engine.async_steps import to_device, write_rows
from textgen_backend.layers.attention import AttentionMetadata
from textgen_backend.layers.lora import LoraBatch

logger = logging.getLogger("textgen")

# (rows, device values) of a step's input ids that are still on the device (async scheduling)
FedIds = tuple[np.ndarray, torch.Tensor]

# Prompts per prefill or mixed graph: enough for the prefills of a lightly loaded server (one or
# a few new requests per step) and for the prompt chunks beside a decode batch; under load,
# prefills are long enough to be GPU-bound eagerly.
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


class StagingBuffer:
    """A pinned host buffer that each step's integer inputs cross to the device through, reused
    step after step. Before it is rewritten, the host waits for the device to have copied the
    previous step's inputs out of it: a step that samples nothing (a prompt chunk) never syncs,
    so the next step could otherwise overwrite them before they were read."""

    def __init__(self, device: torch.device) -> None:
        self.pinned = device.type == "cuda"
        self.buffer = torch.empty(0, dtype=torch.int32)
        self.copied = torch.cuda.Event() if self.pinned else None

    def take(self, size: int) -> torch.Tensor:
        """The buffer's first `size` int32s (their contents undefined)."""
        if self.copied is not None:
            self.copied.synchronize()
        if len(self.buffer) < size:
            self.buffer = torch.empty(2 * size, dtype=torch.int32)
            if self.pinned:
                self.buffer = self.buffer.pin_memory()
        return self.buffer[:size]

    def copy_to(self, device_tensor: torch.Tensor, host: torch.Tensor) -> None:
        """Copies `host` (taken from the buffer) into device_tensor, asynchronously."""
        device_tensor.copy_(host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()


class _GraphSet:
    """Graphs captured over one static input buffer, one per size (sizes: smallest first;
    captured largest first, so that the shared memory pool fits the smaller ones). Each graph's
    outputs are (logits, hidden states) of its output rows."""

    def __init__(self, sizes: list, buffer_len: int, device: torch.device, pool) -> None:
        self.sizes = sizes
        self.inputs = torch.zeros(buffer_len, dtype=torch.int32, device=device)
        self.graphs: dict = {}
        self.outputs: dict = {}
        self.pool = pool

    def capture(self, forward, prepare) -> None:
        """prepare(size) fills the buffer with a valid padding-only step; forward(size) runs."""
        with torch.inference_mode():
            for size in reversed(self.sizes):
                prepare(size)
                forward(size)                  # warm-up (Triton compiles here)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[size] = forward(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()

    def replay(self, size, staging: StagingBuffer, host: torch.Tensor, rows: np.ndarray,
               fed: FedIds | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden) of the given output rows (a prefix is sliced, others gathered).
        fed: (buffer indices, device values) of input ids the host does not know yet."""
        staging.copy_to(self.inputs[:len(host)], host)
        if fed is not None:
            write_rows(self.inputs, *fed)
        logits, hidden = self._launch(size)
        if np.array_equal(rows, np.arange(len(rows))):
            return logits[:len(rows)], hidden[:len(rows)]
        index = to_device(rows, logits.device)
        return logits[index], hidden[index]

    def _launch(self, size) -> tuple[torch.Tensor, torch.Tensor]:
        self.graphs[size].replay()
        return self.outputs[size]


def fill_block_tables(tables: np.ndarray, block_ids: list[list[int]],
                      rows: np.ndarray | None = None) -> None:
    """Row i (or rows[i]) of a zeroed [batch, width] table gets sequence i's block ids."""
    for i, ids in enumerate(block_ids):
        tables[i if rows is None else rows[i], :len(ids)] = ids


def _fill(arrays: StepArrays, ids, positions, slots, context_lens, tables,
          token_rows: np.ndarray | None = None, seq_rows: np.ndarray | None = None) -> None:
    """Writes a step into the parts of a zeroed host buffer, its tokens and sequences at
    token_rows and seq_rows (default: from the start): other token slots are padding (-1,
    nothing stored), other sequence rows read nothing (length 0)."""
    tokens = slice(len(arrays.ids)) if token_rows is None else token_rows
    slots[:] = -1
    ids[tokens] = arrays.ids
    positions[tokens] = arrays.positions
    slots[tokens] = arrays.slots
    context_lens[slice(len(arrays.context_lens)) if seq_rows is None else seq_rows] = \
        arrays.context_lens
    fill_block_tables(tables, arrays.block_ids, seq_rows)


class DecodeGraphs:
    """Decode graphs by batch size; buffer [ids | positions | slots | context_lens | tables],
    then, in the graphs of steps with adapters (lora given), each row's adapter slot."""

    def __init__(self, model: nn.Module, batch_sizes: tuple[int, ...], table_width: int,
                 device: torch.device, pool, lora: LoraBatch | None = None) -> None:
        self.model = model
        self.table_width = table_width
        self.lora = lora
        largest = max(batch_sizes)
        self.set = _GraphSet(sorted(batch_sizes), self._buffer_len(largest), device, pool)
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.set.capture(self._forward, self._prepare)
        logger.info("[textgen] captured decode CUDA graphs%s for batch sizes %s",
                    " with adapters" if lora else "", self.set.sizes)

    def fits(self, batch: int) -> bool:
        return batch <= self.set.sizes[-1]

    def size_for(self, batch: int) -> int:
        """The smallest captured batch size holding `batch` sequences."""
        return next(s for s in self.set.sizes if s >= batch)

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
        if self.lora is not None:
            self.lora.slot_of_token = adapter_slots[0]
        try:
            hidden = self.model(ids, positions, meta)
        finally:
            if self.lora is not None:
                self.lora.slot_of_token = None
        return self.model.compute_logits(hidden), hidden

    def run(self, arrays: StepArrays, staging: StagingBuffer, sampled_rows: np.ndarray,
            fed: FedIds | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replays the smallest graph holding the batch: (logits, hidden states) of the rows
        sampled. fed: (token rows, device values) of ids still on the device."""
        batch = len(arrays.ids)
        size = self.size_for(batch)
        buffer = staging.take(self._buffer_len(size))
        buffer.zero_()
        parts = [part.numpy() for part in self._split(size, buffer)]
        _fill(arrays, *parts[:5])
        if self.lora is not None:
            parts[5][:batch] = arrays.lora_slots
            parts[5][batch:] = -1
        return self.set.replay(size, staging, buffer, sampled_rows, fed)


@dataclass(frozen=True)
class VarlenShape:
    """A varlen graph's static shape: decode_rows one-token sequences first (the decode kernel),
    then up to `tokens` query tokens of at most `seqs` sequences, none longer than
    max_seqlen_q (the prefill kernel)."""
    decode_rows: int
    tokens: int
    seqs: int
    max_seqlen_q: int


def prefill_shapes(token_counts: tuple[int, ...]) -> list[VarlenShape]:
    """Up to PREFILL_GRAPH_MAX_SEQS prompts (or chunks) of `tokens` tokens in all."""
    return [VarlenShape(0, t, PREFILL_GRAPH_MAX_SEQS, t) for t in token_counts]


def mixed_shapes(batch_sizes: tuple[int, ...], token_counts: tuple[int, ...]) -> list[VarlenShape]:
    """A decode batch beside prompt chunks (chunked prefill): every batch size x chunk tokens."""
    return [VarlenShape(b, t, PREFILL_GRAPH_MAX_SEQS, t) for b in batch_sizes for t in token_counts]


def verify_shapes(batch_sizes: tuple[int, ...], drafts: int) -> list[VarlenShape]:
    """Decoding rows with up to `drafts` drafts each (speculative decoding), by batch size and
    by drafts per row on average (n-gram proposals are often shorter than N, or empty)."""
    return [VarlenShape(0, b * (n + 1), b, drafts + 1) for b in batch_sizes
            for n in range(1, drafts + 1)]


class VarlenGraphs:
    """Varlen graphs by shape; buffer [ids | positions | slots (D + T each) | context_lens
    (D + S) | cu_seqlens (S + 1) | tables ((D + S) x W)], the decode rows' first. Padding tokens
    follow each part's last real one and belong to no sequence (the prefill kernel reads the
    extents from cu_seqlens, which repeats the total for padding sequences).

    every_row: logits at every token (verification samples each draft position); otherwise
    at each sequence's last token (the rows a prefill or mixed step samples)."""

    def __init__(self, model: nn.Module, shapes: list[VarlenShape], every_row: bool,
                 table_width: int, device: torch.device, pool) -> None:
        self.model = model
        self.table_width = table_width
        self.every_row = every_row
        shapes = sorted(set(shapes), key=lambda s: (s.decode_rows + s.tokens, s.decode_rows))
        largest = max(self._buffer_len(s) for s in shapes)
        self.decode_index = torch.arange(max(s.decode_rows for s in shapes), device=device)
        self.set = _GraphSet(shapes, largest, device, pool)
        self.set.capture(self._forward, self._prepare)
        logger.info("[textgen] captured %d %s CUDA graphs, up to %d tokens", len(shapes),
                    "verification" if every_row else "prefill / mixed",
                    max(s.decode_rows + s.tokens for s in shapes))

    def shape_for(self, arrays: StepArrays) -> VarlenShape | None:
        """The smallest captured shape holding the step, or None."""
        return self._fit(arrays)[0]

    def _fit(self, arrays: StepArrays) -> tuple[VarlenShape | None, int]:
        """(the smallest captured shape holding the step, how many of its leading sequences
        that shape's decode rows take: the step's one-token head, or none)."""
        lens = np.diff(arrays.cu_seqlens)
        lead = leading_decode_rows(lens)
        # (sequences, tokens, longest query) of the prefill part, with either split
        parts = {d: (len(lens) - d, int(lens[d:].sum()), int(lens[d:].max())) for d in {0, lead}}
        for shape in self.set.sizes:
            d = lead if shape.decode_rows else 0
            seqs, tokens, longest = parts[d]
            if (d <= shape.decode_rows and seqs <= shape.seqs and tokens <= shape.tokens
                    and longest <= shape.max_seqlen_q):
                return shape, d
        return None, 0

    def _buffer_len(self, shape: VarlenShape) -> int:
        d, t, s = shape.decode_rows, shape.tokens, shape.seqs
        return 3 * (d + t) + (d + s) + (s + 1) + (d + s) * self.table_width

    def _split(self, shape: VarlenShape, buffer):
        d, t, s = shape.decode_rows, shape.tokens, shape.seqs
        ids, positions, slots, context_lens, cu_seqlens, tables = buffer[
            :self._buffer_len(shape)].split([d + t, d + t, d + t, d + s, s + 1,
                                             (d + s) * self.table_width])
        return ids, positions, slots, context_lens, cu_seqlens, tables.reshape(
            d + s, self.table_width)

    def _prepare(self, shape: VarlenShape) -> None:
        self.set.inputs.zero_()
        self._split(shape, self.set.inputs)[2].fill_(-1)

    def _forward(self, shape: VarlenShape) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions, slots, context_lens, cu_seqlens, tables = self._split(shape,
                                                                             self.set.inputs)
        d = shape.decode_rows
        meta = AttentionMetadata(is_decode=False, slot_mapping=slots, context_lens=context_lens,
                                 block_tables=tables, cu_seqlens_q=cu_seqlens,
                                 max_seqlen_q=shape.max_seqlen_q, decode_rows=d)
        hidden = self.model(ids, positions, meta)
        if not self.every_row:
            # a padding sequence's "last token" is the last real one: its rows are not returned
            hidden = hidden[torch.cat([self.decode_index[:d],
                                       d + (cu_seqlens[1:] - 1).clamp(min=0)])]
        return self.model.compute_logits(hidden), hidden

    def run(self, arrays: StepArrays, staging: StagingBuffer, sampled_rows: np.ndarray,
            fed: FedIds | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, hidden states) of the step's sampled token rows (without every_row, each
        is a sequence's last token, whose output row is the sequence's). fed: (token rows,
        device values) of ids still on the device."""
        shape, d = self._fit(arrays)
        num_tokens, batch = len(arrays.ids), len(arrays.context_lens)
        gap = shape.decode_rows - d  # padding decode rows before the prefill part
        token_rows = np.arange(num_tokens)
        token_rows[d:] += gap
        seq_rows = np.arange(batch)
        seq_rows[d:] += gap
        buffer = staging.take(self._buffer_len(shape))
        buffer.zero_()
        ids, positions, slots, context_lens, cu_seqlens, tables = (
            part.numpy() for part in self._split(shape, buffer))
        _fill(arrays, ids, positions, slots, context_lens, tables, token_rows, seq_rows)
        cu_seqlens[:batch - d + 1] = arrays.cu_seqlens[d:] - d
        cu_seqlens[batch - d + 1:] = num_tokens - d
        rows = (token_rows[sampled_rows] if self.every_row else
                seq_rows[np.searchsorted(arrays.cu_seqlens, sampled_rows, side="right") - 1])
        if fed is not None:
            fed = (token_rows[fed[0]], fed[1])  # the ids' places in the buffer
        return self.set.replay(shape, staging, buffer, rows, fed)


def leading_decode_rows(lens: np.ndarray) -> int:
    """One-token sequences at the head of a varlen step, which the decode kernel can take; the
    last sequence always stays with the prefill kernel (a varlen step has a prefill part)."""
    longer = np.flatnonzero(lens[:-1] != 1)
    return int(longer[0]) if len(longer) else len(lens) - 1
