"""Runs one scheduled step on the model: builds the step's tensors, runs the forward pass over
the paged KV cache (decode through a CUDA graph when one is captured), samples. The only host
sync is reading the sampled tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from textgen_backend.layers.attention import AttentionMetadata
from textgen_backend.models.config import ModelConfig
from textgen_backend.sampling.sampler import SampleOutput, build_sampling_batch, sample
from textgen_backend.engine.scheduler import SchedulerOutput, TokenLogprob
from textgen_backend.engine.sequence import Sequence

logger = logging.getLogger("textgen")


class StepInputs:
    """A step's integer inputs, packed into one host buffer and copied to the device at once."""

    def __init__(self, input_ids, positions, slots, context_lens, cu_seqlens, block_tables):
        parts = [input_ids, positions, slots, context_lens, cu_seqlens, block_tables.reshape(-1)]
        packed = np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])
        self.num_tokens, self.batch = len(input_ids), len(context_lens)
        self.cu_seqlens = np.asarray(cu_seqlens)
        self.max_seqlen_q = int(np.max(np.diff(self.cu_seqlens)))
        self.table_width = block_tables.shape[1]
        self.host = torch.from_numpy(packed)

    def to(self, device: torch.device, staging: torch.Tensor | None = None):
        """(input_ids, positions, slot_mapping, context_lens, cu_seqlens, block_tables) on device.

        staging: a pinned host buffer to copy through (reused each step: the step's final sync
        guarantees the previous copy finished)."""
        host = self.host
        if staging is not None:
            host = staging
            host.copy_(self.host)
        flat = host.to(device, non_blocking=True)
        t, b = self.num_tokens, self.batch
        sizes = [t, t, t, b, b + 1, b * self.table_width]
        ids, positions, slots, context_lens, cu_seqlens, tables = flat.split(sizes)
        return ids, positions, slots, context_lens, cu_seqlens, tables.view(b, self.table_width)


@dataclass
class DecodeArrays:
    """A decode step's per-sequence inputs on the host."""
    ids: list[int]
    positions: np.ndarray
    slots: list[int]
    context_lens: list[int]
    block_ids: list[list[int]]


@dataclass
class StepResult:
    sampled: SampleOutput
    prompt_logprobs: dict[int, list[TokenLogprob | None]] | None  # by sequence id


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, block_size: int, eos_token_ids: tuple[int, ...],
                 watermark_gamma: float = 0.5, watermark_delta: float = 2.0):
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.watermark_gamma, self.watermark_delta = watermark_gamma, watermark_delta
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: DecodeGraphs | None = None
        self._staging = torch.empty(0, dtype=torch.int32)

    def _pinned(self, size: int) -> torch.Tensor:
        """A pinned host buffer of at least `size` int32s, reused from step to step (each step
        ends with a sync, so the previous step's copy out of it has finished)."""
        if len(self._staging) < size:
            self._staging = torch.empty(2 * size, dtype=torch.int32).pin_memory()
        return self._staging[:size]

    def _upload(self, inputs: StepInputs):
        if self.device.type != "cuda":
            return inputs.to(self.device)
        return inputs.to(self.device, self._pinned(len(inputs.host)))

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
    def execute(self, out: SchedulerOutput) -> StepResult:
        sampling = build_sampling_batch(out.seqs, self.eos_token_ids,
                                        self.model_config.vocab_size, self.device,
                                        self.watermark_gamma, self.watermark_delta)
        prompt_logprobs = None
        if not out.is_prefill and self.graphs is not None and self.graphs.fits(len(out.seqs)):
            logits = self.graphs.run(self._decode_arrays(out.seqs), self._pinned)
        else:
            inputs = (self._prefill_inputs(out.seqs) if out.is_prefill
                      else self._decode_inputs(out.seqs))
            ids, positions, slots, context_lens, cu_seqlens, tables = self._upload(inputs)
            meta = AttentionMetadata(is_decode=not out.is_prefill, slot_mapping=slots,
                                     context_lens=context_lens, block_tables=tables,
                                     cu_seqlens_q=cu_seqlens,
                                     max_seqlen_q=inputs.max_seqlen_q)
            hidden = self.model(ids, positions, meta)
            logits = self.model.compute_logits(hidden[cu_seqlens[1:] - 1])
            if out.is_prefill:
                prompt_logprobs = self._prompt_logprobs(out.seqs, hidden, ids, inputs)
        return StepResult(sample(logits, sampling), prompt_logprobs)

    def _prompt_logprobs(self, seqs, hidden, ids, inputs: StepInputs):
        """{seq_id: details of each prompt token} for sequences that asked (first prefill only):
        token j's logprob comes from position j - 1; the first token has none."""
        wanted = [(i, s) for i, s in enumerate(seqs)
                  if s.details.input_details and not s.input_details_done]
        if not wanted:
            return None
        result = {}
        for i, s in wanted:
            start, end = inputs.cu_seqlens[i], inputs.cu_seqlens[i + 1]
            log_probs = torch.log_softmax(self.model.compute_logits(hidden[start:end - 1]), -1)
            targets = ids[start + 1:end].long()
            chosen = log_probs.gather(1, targets[:, None])[:, 0]
            ranks = (log_probs > chosen[:, None]).sum(dim=-1) + 1
            n = s.details.top_n_tokens
            top = log_probs.topk(n, dim=-1) if n else None
            details = [None]
            for j, (logprob, rank) in enumerate(zip(chosen.tolist(), ranks.tolist())):
                alternatives = (list(zip(top.indices[j].tolist(), top.values[j].tolist()))
                                if top is not None else [])
                details.append(TokenLogprob(logprob, rank, alternatives))
            result[s.seq_id] = details
            s.input_details_done = True
        return result

    def _prefill_inputs(self, seqs: list[Sequence]) -> StepInputs:
        lengths = [s.num_tokens for s in seqs]
        token_ids = [t for s in seqs for t in s.all_ids]
        positions = np.concatenate([np.arange(n) for n in lengths])
        slots = np.concatenate([self._slots(s.block_ids, n) for s, n in zip(seqs, lengths)])
        cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
        return StepInputs(token_ids, positions, slots, lengths, cu_seqlens, self._tables(seqs))

    def _decode_arrays(self, seqs: list[Sequence]) -> DecodeArrays:
        bs = self.block_size
        lengths = [s.num_tokens for s in seqs]
        slots = [s.block_ids[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lengths)]
        return DecodeArrays(ids=[s.last_token for s in seqs], positions=np.asarray(lengths) - 1,
                            slots=slots, context_lens=lengths, block_ids=[s.block_ids for s in seqs])

    def _decode_inputs(self, seqs: list[Sequence]) -> StepInputs:
        a = self._decode_arrays(seqs)
        return StepInputs(a.ids, a.positions, a.slots, a.context_lens, np.arange(len(seqs) + 1),
                          self._tables(seqs))

    @staticmethod
    def _tables(seqs: list[Sequence]) -> np.ndarray:
        tables = np.zeros((len(seqs), max(len(s.block_ids) for s in seqs)), dtype=np.int32)
        for row, s in enumerate(seqs):
            tables[row, :len(s.block_ids)] = s.block_ids
        return tables

    def _slots(self, block_ids: list[int], num_tokens: int) -> np.ndarray:
        bs = self.block_size
        return (np.asarray(block_ids)[:, None] * bs + np.arange(bs)).reshape(-1)[:num_tokens]


class DecodeGraphs:
    """CUDA graphs of the decode forward pass (embedding to logits), one per captured batch
    size. A batch runs in the smallest graph that holds it; its padding rows have context length
    0 and slot -1 (nothing read, nothing stored). Each graph reads its inputs from one static
    int32 buffer laid out [ids | positions | slots | context_lens | block tables], filled by a
    single host-to-device copy per step."""

    def __init__(self, model: nn.Module, batch_sizes: tuple[int, ...], table_width: int,
                 vocab_size: int, device: torch.device):
        self.model = model
        self.table_width = table_width
        self.batch_sizes = sorted(batch_sizes)
        self.inputs = torch.zeros(self._buffer_len(self.batch_sizes[-1]), dtype=torch.int32,
                                  device=device)
        self.cu_seqlens = torch.arange(self.batch_sizes[-1] + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.batch_sizes):  # largest first: the pool fits the rest
                self.inputs[self._layout(size)["slots"]].fill_(-1)
                self._forward(size)                  # warm-up (Triton compiles here)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("[textgen] captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def fits(self, batch: int) -> bool:
        return batch <= self.batch_sizes[-1]

    def _buffer_len(self, size: int) -> int:
        return size * (4 + self.table_width)

    @staticmethod
    def _layout(size: int) -> dict[str, slice]:
        return {name: slice(i * size, (i + 1) * size)
                for i, name in enumerate(("ids", "positions", "slots", "context_lens"))}

    def _forward(self, size: int) -> torch.Tensor:
        part = {name: self.inputs[sl] for name, sl in self._layout(size).items()}
        tables = self.inputs[4 * size:self._buffer_len(size)].view(size, self.table_width)
        meta = AttentionMetadata(is_decode=True, slot_mapping=part["slots"],
                                 context_lens=part["context_lens"], block_tables=tables,
                                 cu_seqlens_q=self.cu_seqlens[:size + 1], max_seqlen_q=1)
        hidden = self.model(part["ids"], part["positions"], meta)
        return self.model.compute_logits(hidden)

    def run(self, arrays: DecodeArrays, pinned) -> torch.Tensor:
        """Replays the smallest graph holding the batch; pinned(n) gives a host buffer."""
        batch = len(arrays.ids)
        size = next(s for s in self.batch_sizes if s >= batch)
        buffer = pinned(self._buffer_len(size))
        host = buffer.numpy()
        host[:] = 0
        layout = self._layout(size)
        host[layout["ids"]][:batch] = arrays.ids
        host[layout["positions"]][:batch] = arrays.positions
        slots = host[layout["slots"]]
        slots[:batch] = arrays.slots
        slots[batch:] = -1                    # padding rows store nothing
        host[layout["context_lens"]][:batch] = arrays.context_lens  # padding rows read nothing
        tables = host[4 * size:].reshape(size, self.table_width)
        for row, ids in enumerate(arrays.block_ids):
            tables[row, :len(ids)] = ids
        self.inputs[:len(host)].copy_(buffer, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:batch]
