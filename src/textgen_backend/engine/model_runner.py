"""Runs one scheduled step on the model: builds the step's tensors, runs the forward pass over
the paged KV cache (decode through a CUDA graph when one is captured), samples. launch() queues
all of it on the device; the only host sync is reading the sampled tokens (LaunchedStep.result),
which async scheduling defers until the next step is launched."""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from textgen_backend.engine.async_steps import TokenFeed, count_pending, to_device, write_rows
from textgen_backend.engine.cuda_graphs import (DecodeGraphs, StagingBuffer, StepArrays,
                                                VarlenGraphs, VarlenShape, fill_block_tables,
                                                leading_decode_rows)
from textgen_backend.adapters.shard_loads import WorkerAdapterLoads
from textgen_backend.adapters.slots import AdapterSlots
from textgen_backend.layers.attention import AttentionMetadata
from textgen_backend.layers.lora import LoraBatch
from textgen_backend.models.config import ModelConfig
from textgen_backend.parallel.group import ShardGroup, collective
from textgen_backend.sampling.grammar import GrammarMatchers
from textgen_backend.sampling.sampler import (DeviceSample, SampleOutput, build_sampling_batch,
                                              select)
from textgen_backend.speculation.medusa import MedusaHeads
from textgen_backend.engine.scheduler import SchedulerOutput, TokenLogprob
from textgen_backend.engine.sequence import Sequence

logger = logging.getLogger("textgen")


class StepInputs:
    """A step's integer inputs, packed into one host buffer and copied to the device at once."""

    def __init__(self, input_ids, positions, slots, context_lens, cu_seqlens, block_tables,
                 decode_rows: int = 0):
        # a mixed step's decode rows go to the decode kernel: cu_seqlens then counts the others
        self.decode_rows = decode_rows
        cu_seqlens = np.asarray(cu_seqlens)[decode_rows:] - decode_rows
        parts = [input_ids, positions, slots, context_lens, cu_seqlens, block_tables.reshape(-1)]
        packed = np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])
        self.num_tokens, self.batch = len(input_ids), len(context_lens)
        self.max_seqlen_q = int(np.max(np.diff(cu_seqlens)))
        self.table_width = block_tables.shape[1]
        self.host = torch.from_numpy(packed)

    def to(self, device: torch.device, staging: StagingBuffer):
        """(input_ids, positions, slot_mapping, context_lens, cu_seqlens, block_tables) on
        device, copied through the staging buffer."""
        host = staging.take(len(self.host))
        host.copy_(self.host)
        flat = torch.empty(len(host), dtype=torch.int32, device=device)
        staging.copy_to(flat, host)
        t, b = self.num_tokens, self.batch
        sizes = [t, t, t, b, b + 1 - self.decode_rows, b * self.table_width]
        ids, positions, slots, context_lens, cu_seqlens, tables = flat.split(sizes)
        return ids, positions, slots, context_lens, cu_seqlens, tables.view(b, self.table_width)


@dataclass
class ForwardStep:
    """A step as every tensor-parallel rank runs it: host data only (rank 0 sends it to the
    others, which run the same forward and collectives; rank 0 alone samples)."""
    arrays: StepArrays
    varlen: bool                      # packed prompts / drafts, not one token per sequence
    graphs: str | None                # the runner's graph set replaying it, or None: eager
    sampled_rows: np.ndarray          # the token rows sampled
    soft_prompts: tuple[np.ndarray, torch.Tensor] | None  # virtual tokens' rows, embeddings
    detail_spans: list[tuple[int, int]]  # hidden rows [first, last) prompt details need
    keep_hidden_rows: bool            # Medusa drafts from the sampled rows' hidden states
    fed_rows: np.ndarray | None = None  # token rows whose ids come from the device (rank 0)


@dataclass
class ForwardOutput:
    logits: torch.Tensor              # [sampled rows, vocab] float32
    hidden_rows: torch.Tensor | None = None
    detail_logits: list[torch.Tensor] = dataclasses.field(default_factory=list)


@dataclass
class StepResult:
    sampled: SampleOutput
    prompt_logprobs: dict[int, list[TokenLogprob | None]] | None  # by sequence id
    next_drafts: list[list[int]] | None = None  # Medusa's drafts at each sampled row


@dataclass
class LaunchedStep:
    """A step queued on the device; result() waits for its tokens."""
    sample: DeviceSample | None       # None: prompt chunks only, nothing sampled
    prompt_logprobs: dict[int, list[TokenLogprob | None]] | None
    sampled_row_of: dict[int, int]    # sequence id -> its row among the sampled tokens
    next_drafts: torch.Tensor | None = None

    def result(self) -> StepResult:
        if self.sample is None:
            return StepResult(SampleOutput([]), self.prompt_logprobs)
        return StepResult(self.sample.fetch(), self.prompt_logprobs,
                          None if self.next_drafts is None else self.next_drafts.tolist())


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, block_size: int, eos_token_ids: tuple[int, ...],
                 watermark_gamma: float = 0.5, watermark_delta: float = 2.0,
                 kv_cache_dtype: torch.dtype | None = None):
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype  # float8_e4m3fn: --kv-cache-dtype fp8
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.watermark_gamma, self.watermark_delta = watermark_gamma, watermark_delta
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.decode_graphs: DecodeGraphs | None = None
        self.prefill_graphs: VarlenGraphs | None = None   # prefills and mixed steps
        self.verify_graphs: VarlenGraphs | None = None    # steps with drafts
        self.adapter_slots: AdapterSlots | None = None  # set when adapters are served
        self.lora_batch: LoraBatch | None = None        # their slots' batch
        self.adapter_loads: WorkerAdapterLoads | None = None  # a tensor-parallel worker's
        self.adapter_decode_graphs: DecodeGraphs | None = None
        self.grammars: GrammarMatchers | None = None    # set when grammars are served
        self.medusa: MedusaHeads | None = None          # set when speculating with Medusa
        self._staging = StagingBuffer(device)
        self._fed_tokens: torch.Tensor | None = None  # launch()'s feed, for forward()
        self.shards: ShardGroup | None = None           # rank 0's, when tensor-parallel

    def load_adapter(self, load_id: int, ref, slot: int) -> None:
        """A tensor-parallel worker's share of an adapter rank 0 loads (a call it sends)."""
        self.adapter_loads.start(load_id, ref, slot)

    def kv_bytes_per_block(self) -> int:
        """On this rank (whose attention layers hold their share of the KV heads)."""
        layers = self.model.attention_layers()
        per_token = 2 * len(layers) * layers[0].num_kv_heads * layers[0].head_dim
        return per_token * self.kv_cache_dtype.itemsize * self.block_size

    @collective
    def allocate_kv_cache(self, num_blocks: int) -> None:
        layers = self.model.attention_layers()
        shape = (num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        self.kv_caches = []
        for attn in layers:
            attn.k_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
            attn.v_cache = torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device)
            self.kv_caches.append((attn.k_cache, attn.v_cache))

    @collective
    def compile_adapter_kernels(self, max_tokens: int) -> None:
        self.adapter_slots.compile_kernels(max_tokens)

    @collective
    def capture_cuda_graphs(self, decode_batch_sizes: tuple[int, ...],
                            prefill_shapes: list[VarlenShape], verify_shapes: list[VarlenShape],
                            max_blocks_per_seq: int) -> None:
        if self.device.type != "cuda":
            return
        pool = torch.cuda.graph_pool_handle()  # one pool: steps never overlap
        if prefill_shapes:
            self.prefill_graphs = VarlenGraphs(self.model, prefill_shapes, False,
                                               max_blocks_per_seq, self.device, pool)
        if verify_shapes:
            self.verify_graphs = VarlenGraphs(self.model, verify_shapes, True,
                                              max_blocks_per_seq, self.device, pool)
        if decode_batch_sizes:
            self.decode_graphs = DecodeGraphs(self.model, decode_batch_sizes,
                                              max_blocks_per_seq, self.device, pool)
            if self.lora_batch is not None:
                self.adapter_decode_graphs = DecodeGraphs(
                    self.model, decode_batch_sizes, max_blocks_per_seq, self.device, pool,
                    self.lora_batch)

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Runs the step and waits for its tokens."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queues the step; samples for the sequences it completes (out.completes()), at each of
        their draft positions too. previous: the step launched before, whose tokens are still
        pending on the host (they go from its device tensor into this step's inputs)."""
        completes = out.completes()
        sampled_seqs = [s for s, done in zip(out.seqs, completes) if done]
        sampled_drafts = [d for d, done in zip(out.drafts, completes) if done]
        varlen = out.is_prefill or out.draft_ids is not None
        arrays = (self._prefill_arrays(out.seqs, out.num_new_tokens, out.drafts) if varlen
                  else self._decode_arrays(out.seqs))
        feed = (TokenFeed.of(arrays.ids, arrays.cu_seqlens, out.seqs, previous.sampled_row_of)
                if previous is not None else None)
        details = self._detail_spans(out, arrays.cu_seqlens) if out.is_prefill else []
        graphs = self._graphs_for(out, arrays)
        self._fed_tokens = feed.values(previous.sample.tokens) if feed else None
        try:
            forward = self.forward(ForwardStep(
                arrays, varlen, graphs,
                _sampled_rows(arrays.cu_seqlens, completes, out.drafts),
                self._soft_prompts(out, arrays.cu_seqlens),
                [(first, end - 1) for _, first, end in details], self.medusa is not None,
                feed.rows if feed else None))
        finally:
            self._fed_tokens = None
        prompt_logprobs = (self._prompt_logprobs(details, forward.detail_logits, arrays.ids)
                           if details else None)
        if not sampled_seqs:  # prefill chunks only
            return LaunchedStep(None, prompt_logprobs, {})
        logits = forward.logits
        positions = _draft_positions(sampled_seqs, sampled_drafts)
        if self.grammars is not None:
            # filled on the host while the GPU still runs the forward pass (no sync before)
            masks = self.grammars.masks([s.matcher for s in positions])
            if masks is not None:
                self.grammars.apply(logits, masks)
        sampling = build_sampling_batch(positions, self.eos_token_ids,
                                        self.model_config.vocab_size, self.device,
                                        self.watermark_gamma, self.watermark_delta)
        if feed is not None and sampling.penalties is not None:
            count_pending(sampling.penalties.output_counts, positions, previous.sample.tokens,
                          previous.sampled_row_of)
        selected = select(logits, sampling)
        selected.start_copy()
        return LaunchedStep(selected, prompt_logprobs,
                            {s.seq_id: row for row, s in enumerate(sampled_seqs)},
                            self.medusa(forward.hidden_rows) if self.medusa is not None else None)

    @collective
    @torch.inference_mode()
    def forward(self, step: ForwardStep) -> ForwardOutput:
        """The step's forward pass (a CUDA graph's replay, or eager), up to the logits of the
        rows sampled and those prompt details need; every tensor-parallel rank runs it."""
        fed = None if step.fed_rows is None else (step.fed_rows, self._fed_tokens)
        if step.graphs is not None:
            logits, hidden_rows = getattr(self, step.graphs).run(step.arrays, self._staging,
                                                                 step.sampled_rows, fed)
            return ForwardOutput(logits, hidden_rows if step.keep_hidden_rows else None)
        a = step.arrays
        inputs = StepInputs(a.ids, a.positions, a.slots, a.context_lens, a.cu_seqlens,
                            self._tables(a.block_ids),
                            leading_decode_rows(np.diff(a.cu_seqlens)) if step.varlen else 0)
        ids, positions, slots, context_lens, cu_seqlens, tables = inputs.to(self.device,
                                                                            self._staging)
        if fed is not None:
            write_rows(ids, *fed)
        meta = AttentionMetadata(is_decode=not step.varlen, slot_mapping=slots,
                                 context_lens=context_lens, block_tables=tables,
                                 cu_seqlens_q=cu_seqlens, max_seqlen_q=inputs.max_seqlen_q,
                                 decode_rows=inputs.decode_rows)
        soft_prompts = None
        if step.soft_prompts is not None:
            rows, vectors = step.soft_prompts
            soft_prompts = (to_device(rows, self.device), vectors.to(self.device))
        if a.lora_slots is not None:
            self.lora_batch.slot_of_token = to_device(a.lora_slots, self.device)
        try:
            hidden = self.model(ids, positions, meta, soft_prompts)
        finally:
            if self.lora_batch is not None:
                self.lora_batch.slot_of_token = None
        hidden_rows = hidden[to_device(step.sampled_rows, self.device)]
        return ForwardOutput(self.model.compute_logits(hidden_rows),
                             hidden_rows if step.keep_hidden_rows else None,
                             [self.model.compute_logits(hidden[first:last])
                              for first, last in step.detail_spans])

    def _graphs_for(self, out: SchedulerOutput, arrays: StepArrays) -> str | None:
        """The graphs that can run this step (the attribute's name), or None to run it
        eagerly: varlen steps with adapters or soft prompts, and prefills that want prompt
        token details (every position's logits)."""
        if not out.is_prefill and out.draft_ids is None:
            name = "decode_graphs" if arrays.lora_slots is None else "adapter_decode_graphs"
            graphs = getattr(self, name)
            return name if graphs is not None and graphs.fits(len(out.seqs)) else None
        if arrays.lora_slots is not None or any(s.prefix is not None for s in out.seqs):
            return None
        if any(s.details.input_details and not s.input_details_done for s in out.seqs):
            return None
        name = "prefill_graphs" if out.draft_ids is None else "verify_graphs"
        graphs = getattr(self, name)
        return name if graphs is not None and graphs.shape_for(arrays) is not None else None

    def _soft_prompts(self, out: SchedulerOutput, cu_seqlens: np.ndarray):
        """(rows, embeddings) of the virtual tokens of a prefill's soft prompts, or None."""
        if not out.is_prefill or all(s.prefix is None for s in out.seqs):
            return None
        # virtual tokens computed in this step: [start, end) of the soft prompt at `row`
        spans = [(row, s.num_computed_tokens, min(s.num_computed_tokens + n, s.num_virtual_tokens),
                  s.prefix_embeddings)
                 for row, s, n in zip(cu_seqlens, out.seqs, out.num_new_tokens)
                 if s.prefix is not None and s.num_computed_tokens < s.num_virtual_tokens]
        if not spans:
            return None
        rows = np.concatenate([np.arange(row, row + end - start)
                               for row, start, end, _ in spans])
        vectors = torch.cat([e[start:end] for _, start, end, e in spans])
        # the other ranks get them pickled: from host memory, not from this rank's device
        return rows, (vectors if self.shards is None else vectors.cpu())

    @staticmethod
    def _detail_spans(out: SchedulerOutput,
                      cu_seqlens: np.ndarray) -> list[tuple[Sequence, int, int]]:
        """(sequence, first, end) for sequences that asked for prompt token details (first
        prefill only): the step's rows [first, end) hold its prompt, from the position before
        its first real token when a soft prompt precedes it (virtual tokens get no details)."""
        spans = []
        for i, s in enumerate(out.seqs):
            if s.details.input_details and not s.input_details_done:
                start = cu_seqlens[i] + s.num_virtual_tokens  # the first real token
                spans.append((s, start - 1 if s.num_virtual_tokens else start,
                              cu_seqlens[i + 1]))
        return spans

    @staticmethod
    def _prompt_logprobs(spans, logits: list[torch.Tensor], ids: list[int]):
        """{seq_id: details of each prompt token}: token j's logprob comes from position j - 1;
        the first token has none, unless a soft prompt precedes it."""
        result = {}
        for (s, first, end), span_logits in zip(spans, logits):
            log_probs = torch.log_softmax(span_logits, -1)
            targets = torch.tensor(ids[first + 1:end], device=log_probs.device)
            chosen = log_probs.gather(1, targets[:, None])[:, 0]
            ranks = (log_probs > chosen[:, None]).sum(dim=-1) + 1
            n = s.details.top_n_tokens
            top = log_probs.topk(n, dim=-1) if n else None
            details = [] if s.num_virtual_tokens else [None]
            for j, (logprob, rank) in enumerate(zip(chosen.tolist(), ranks.tolist())):
                alternatives = (list(zip(top.indices[j].tolist(), top.values[j].tolist()))
                                if top is not None else [])
                details.append(TokenLogprob(logprob, rank, alternatives))
            result[s.seq_id] = details
            s.input_details_done = True
        return result

    def _prefill_arrays(self, seqs: list[Sequence], counts: list[int],
                        drafts: list[list[int]]) -> StepArrays:
        """Each sequence's next counts[i] tokens past those already computed (cached or earlier
        chunks, whose KV they attend to): a prompt, a chunk of one, or a decoding row's one and
        its drafts."""
        starts = [s.num_computed_tokens for s in seqs]
        ends = [start + n for start, n in zip(starts, counts)]
        return StepArrays(
            # a soft prompt's virtual tokens: placeholder ids, their embeddings come separately
            ids=[t for s, d, start, end in zip(seqs, drafts, starts, ends)
                 for t in ([0] * s.num_virtual_tokens + s.all_ids + d)[start:end]],
            positions=np.concatenate([np.arange(start, end) for start, end in zip(starts, ends)]),
            slots=np.concatenate([self._slots(s.block_ids, end)[start:]
                                  for s, start, end in zip(seqs, starts, ends)]),
            context_lens=ends, cu_seqlens=np.concatenate([[0], np.cumsum(counts)]),
            block_ids=[s.block_ids for s in seqs],
            lora_slots=_adapter_slots(seqs, counts))

    def _decode_arrays(self, seqs: list[Sequence]) -> StepArrays:
        bs = self.block_size
        lengths = [s.num_tokens for s in seqs]
        slots = [s.block_ids[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lengths)]
        return StepArrays(ids=[s.last_token for s in seqs], positions=np.asarray(lengths) - 1,
                          slots=np.asarray(slots), context_lens=lengths,
                          cu_seqlens=np.arange(len(seqs) + 1),
                          block_ids=[s.block_ids for s in seqs],
                          lora_slots=_adapter_slots(seqs, [1] * len(seqs)))

    @staticmethod
    def _tables(block_ids: list[list[int]]) -> np.ndarray:
        tables = np.zeros((len(block_ids), max(len(ids) for ids in block_ids)), dtype=np.int32)
        fill_block_tables(tables, block_ids)
        return tables

    def _slots(self, block_ids: list[int], num_tokens: int) -> np.ndarray:
        bs = self.block_size
        return (np.asarray(block_ids)[:, None] * bs + np.arange(bs)).reshape(-1)[:num_tokens]


def _sampled_rows(cu_seqlens: np.ndarray, completes: list[bool],
                  drafts: list[list[int]]) -> np.ndarray:
    """Rows of the step's hidden states that are sampled: the last token of each sequence the
    step completes, preceded by its draft positions."""
    ends = np.asarray(cu_seqlens[1:])[np.asarray(completes, dtype=bool)]
    spans = [np.arange(end - len(d) - 1, end) for end, d in
             zip(ends, [d for d, done in zip(drafts, completes) if done])]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


def _draft_positions(seqs: list[Sequence], drafts: list[list[int]]) -> list[Sequence]:
    """The sampled rows' sequences as the sampler sees them: a sequence, then one view of it
    per draft, as if the drafts before that row had been accepted (its penalties, min_tokens,
    bad words, grammar mask and seeded randomness then see exactly what plain decoding would;
    a grammar's view holds a copy of the matcher that consumed those drafts, which the
    speculator kept to what the grammar allows)."""
    positions = []
    for seq, seq_drafts in zip(seqs, drafts):
        positions.append(seq)
        matcher = seq.matcher
        for j in range(1, len(seq_drafts) + 1):
            view = copy.copy(seq)
            view.output_ids = seq.output_ids + seq_drafts[:j]
            if matcher is not None:
                matcher = matcher.deep_copy()
                matcher.consume_token(seq_drafts[j - 1])
                view.matcher = matcher
            positions.append(view)
    return positions


def _adapter_slots(seqs: list[Sequence], tokens_per_seq: list[int]) -> np.ndarray | None:
    """Each token's adapter slot (-1: the base model), or None when no sequence has one."""
    if all(s.adapter_slot < 0 for s in seqs):
        return None
    return np.repeat(np.asarray([s.adapter_slot for s in seqs], dtype=np.int32), tokens_per_seq)
