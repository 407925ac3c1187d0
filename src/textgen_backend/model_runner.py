"""Runs one scheduled step on the model: builds the step's tensors, runs the forward pass over
the paged KV cache (decode through a CUDA graph when one is captured), samples. The only host
sync is reading the sampled tokens."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from textgen_backend.layers.attention import AttentionMetadata
from textgen_backend.model_config import ModelConfig
from textgen_backend.sampling import build_sampling_batch, sample
from textgen_backend.scheduler import SchedulerOutput
from textgen_backend.sequence import Sequence

logger = logging.getLogger("textgen")


class StepInputs:
    """A step's integer inputs, packed into one host buffer and copied to the device at once."""

    def __init__(self, input_ids, positions, slots, context_lens, cu_seqlens, block_tables):
        parts = [input_ids, positions, slots, context_lens, cu_seqlens, block_tables.reshape(-1)]
        packed = np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])
        self.num_tokens, self.batch = len(input_ids), len(context_lens)
        self.table_width = block_tables.shape[1]
        self.host = torch.from_numpy(packed)

    def to(self, device: torch.device, staging: torch.Tensor | None = None):
        """(input_ids, positions, slot_mapping, context_lens, cu_seqlens, block_tables) on device.

        staging: a pinned host buffer to copy through (reused each step: the step's final sync
        guarantees the previous copy finished)."""
        host = self.host
        if staging is not None:
            host = staging[:len(self.host)]
            host.copy_(self.host)
        flat = host.to(device, non_blocking=True)
        t, b = self.num_tokens, self.batch
        sizes = [t, t, t, b, b + 1, b * self.table_width]
        ids, positions, slots, context_lens, cu_seqlens, tables = flat.split(sizes)
        return ids, positions, slots, context_lens, cu_seqlens, tables.view(b, self.table_width)


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, block_size: int, eos_token_ids: tuple[int, ...]):
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: DecodeGraphs | None = None
        self._staging = torch.empty(0, dtype=torch.int32)

    def _upload(self, inputs: StepInputs):
        if self.device.type != "cuda":
            return inputs.to(self.device)
        if len(self._staging) < len(inputs.host):
            self._staging = torch.empty(2 * len(inputs.host), dtype=torch.int32).pin_memory()
        return inputs.to(self.device, self._staging)

    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        return per_token * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_config
        shape = (num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = []
        for attn in self.model.attention_layers():
            attn.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append((attn.k_cache, attn.v_cache))

    def capture_decode_graphs(self, batch_sizes: tuple[int, ...], max_blocks_per_seq: int) -> None:
        if batch_sizes and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.model, batch_sizes, max_blocks_per_seq,
                                       self.model_config.vocab_size, self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int]:
        sampling = build_sampling_batch(out.seqs, self.eos_token_ids,
                                        self.model_config.vocab_size, self.device)
        if not out.is_prefill and self.graphs is not None and self.graphs.fits(len(out.seqs)):
            inputs = self._decode_inputs(out.seqs, self.graphs.table_width)
            logits = self.graphs.run(inputs.batch, self._upload(inputs))
        else:
            inputs = (self._prefill_inputs(out.seqs) if out.is_prefill
                      else self._decode_inputs(out.seqs))
            logits = self._forward(*self._upload(inputs), is_decode=not out.is_prefill,
                                   max_seqlen_q=max(s.num_tokens for s in out.seqs)
                                   if out.is_prefill else 1)
        return sample(logits, sampling).tolist()

    def _forward(self, ids, positions, slots, context_lens, cu_seqlens, tables, is_decode,
                 max_seqlen_q):
        meta = AttentionMetadata(is_decode=is_decode, slot_mapping=slots,
                                 context_lens=context_lens, block_tables=tables,
                                 cu_seqlens_q=cu_seqlens, max_seqlen_q=max_seqlen_q)
        hidden = self.model(ids, positions, meta)
        return self.model.compute_logits(hidden[cu_seqlens[1:] - 1])

    def _prefill_inputs(self, seqs: list[Sequence]) -> StepInputs:
        lengths = [s.num_tokens for s in seqs]
        token_ids = [t for s in seqs for t in s.all_ids]
        positions = np.concatenate([np.arange(n) for n in lengths])
        slots = np.concatenate([self._slots(s.block_ids, n) for s, n in zip(seqs, lengths)])
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
        return StepInputs(token_ids, positions, slots, lengths, cu_seqlens, self._tables(seqs))

    def _decode_inputs(self, seqs: list[Sequence], table_width: int | None = None) -> StepInputs:
        bs = self.block_size
        lengths = [s.num_tokens for s in seqs]
        slots = [s.block_ids[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lengths)]
        positions = np.asarray(lengths) - 1
        cu_seqlens = np.arange(len(seqs) + 1)
        return StepInputs([s.last_token for s in seqs], positions, slots, lengths, cu_seqlens,
                          self._tables(seqs, table_width))

    @staticmethod
    def _tables(seqs: list[Sequence], width: int | None = None) -> np.ndarray:
        width = width or max(len(s.block_ids) for s in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for row, s in enumerate(seqs):
            tables[row, :len(s.block_ids)] = s.block_ids
        return tables

    def _slots(self, block_ids: list[int], num_tokens: int) -> np.ndarray:
        bs = self.block_size
        return (np.asarray(block_ids)[:, None] * bs + np.arange(bs)).reshape(-1)[:num_tokens]


class DecodeGraphs:
    """CUDA graphs of the decode forward pass (embedding to logits), one per captured batch
    size; a batch runs in the smallest graph that holds it, its padding rows having context
    length 0 and slot -1 (nothing read, nothing stored)."""

    def __init__(self, model: nn.Module, batch_sizes: tuple[int, ...], table_width: int,
                 vocab_size: int, device: torch.device):
        self.model = model
        self.table_width = table_width
        self.batch_sizes = sorted(batch_sizes)
        largest = self.batch_sizes[-1]
        # Static inputs, sliced per graph: ids, positions, slots, context_lens, block tables.
        self.ids = torch.zeros(largest, dtype=torch.int32, device=device)
        self.positions = torch.zeros_like(self.ids)
        self.slots = torch.full_like(self.ids, -1)
        self.context_lens = torch.zeros_like(self.ids)
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.tables = torch.zeros(largest, table_width, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.batch_sizes):  # largest first: the pool fits the rest
                self._forward(size)                  # warm-up (Triton compiles here)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("[textgen] captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def fits(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(is_decode=True, slot_mapping=self.slots[:size],
                                 context_lens=self.context_lens[:size],
                                 block_tables=self.tables[:size],
                                 cu_seqlens_q=self.cu_seqlens[:size + 1], max_seqlen_q=1)
        hidden = self.model(self.ids[:size], self.positions[:size], meta)
        return self.model.compute_logits(hidden)

    def run(self, batch: int, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Replays the graph for `batch` sequences; inputs as StepInputs.to returns them."""
        size = next(s for s in self.batch_sizes if s >= batch)
        ids, positions, slots, context_lens, _, tables = inputs
        self.ids[:batch].copy_(ids)
        self.positions[:batch].copy_(positions)
        self.slots[:batch].copy_(slots)
        self.context_lens[:batch].copy_(context_lens)
        self.tables[:batch].copy_(tables)
        if size > batch:  # padding rows: nothing to read, nothing to store
            self.slots[batch:size].fill_(-1)
            self.context_lens[batch:size].zero_()
        self.graphs[size].replay()
        return self.logits[size][:batch]
