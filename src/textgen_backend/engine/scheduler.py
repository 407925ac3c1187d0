"""Continuous batching with TGI's knobs: which sequences run in the next step.

A step is either a prefill (new sequences join: all their tokens are computed) or a decode
(one token for every running sequence). Waiting sequences join a running batch when at least
waiting_served_ratio x its size can join, or unconditionally once the batch has decoded
max_waiting_tokens steps since the last prefill. A prefill holds at most
max_batch_prefill_tokens tokens (a lone sequence may exceed it: a preempted one being
recomputed). KV blocks are taken as tokens arrive; when a decode step runs out, the most
recently admitted sequence is preempted (its blocks freed, recomputed later) instead of failing.
A sequence whose LoRA adapter or soft prompt is not loaded yet waits without holding up the ones
behind it (adapters/residency.py, prompt_tuning/cache.py load them meanwhile); a running
sequence holds its adapter's slot, and keeps its soft prompt's embeddings to its end.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass

from textgen_backend.adapters.residency import AdapterResidency
from textgen_backend.engine.block_manager import BlockManager
from textgen_backend.prompt_tuning.cache import PromptCache
from textgen_backend.sampling.grammar import GrammarMatchers
from textgen_backend.config import EngineLimits
from textgen_backend.sampling.sampler import SampleOutput
from textgen_backend.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """A step: each sequence's next num_new_tokens[i] tokens are computed (default: all it has
    not computed). A sequence whose tokens are then all computed samples one; a prefill chunk
    that leaves some for later does not. is_prefill: some sequence is not simply decoding (the
    step cannot run as a decode CUDA graph)."""
    seqs: list[Sequence]
    is_prefill: bool
    num_new_tokens: list[int] | None = None
    # speculative drafts per sequence, counted in num_new_tokens (speculation/speculator.py)
    draft_ids: list[list[int]] | None = None
    _completes: list[bool] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.num_new_tokens is None:
            self.num_new_tokens = [s.num_tokens - s.num_computed_tokens for s in self.seqs]

    @property
    def drafts(self) -> list[list[int]]:
        return self.draft_ids or [[] for _ in self.seqs]

    def completes(self) -> list[bool]:
        """Which sequences sample a token in this step (one per draft too); fixed once asked
        (drafts are attached before), so that it still holds once the step is advanced."""
        if self._completes is None:
            self._completes = [s.num_computed_tokens + n - len(d) == s.num_tokens
                               for s, n, d in zip(self.seqs, self.num_new_tokens, self.drafts)]
        return self._completes


@dataclass
class AdvancedStep:
    """A launched step as Scheduler.advance left it: which sequences sample, and where each
    one's pending token sits in its output_ids (-1: none)."""
    completes: list[bool]
    pending: list[int]


@dataclass
class TokenLogprob:
    """A token's logprob under the model, its rank (1 = most likely) and the top alternatives."""
    logprob: float
    rank: int
    top: list[tuple[int, float]]       # (token id, logprob), most likely first


@dataclass
class StepOutput:
    """What one step produced for one sequence."""
    seq_id: int
    new_token_ids: list[int]
    finish_reason: str | None = None   # "length", "eos_token", or an abort reason
    error: str | None = None           # the step failed for this sequence
    logprobs: list[TokenLogprob] | None = None         # one per new token, when tracked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first prefill, when asked
    scheduled_at: float | None = None  # with a sequence's first token: its first admission
    num_cached_tokens: int = 0         # with a sequence's first token: its prefix-cache hit


class Scheduler:
    def __init__(self, limits: EngineLimits, block_manager: BlockManager,
                 eos_token_ids: tuple[int, ...], adapters: AdapterResidency | None = None,
                 prompts: PromptCache | None = None, grammars: GrammarMatchers | None = None):
        self.limits = limits
        self.adapters = adapters
        self.prompts = prompts
        self.grammars = grammars
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps_since_prefill = 0
        self.num_preemptions = 0
        self.oom_batch_cap: int | None = None  # set by an out-of-memory step, lifted by Engine
        self.num_prefill_limit_hits = 0   # prefills that max_batch_prefill_tokens cut short

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq_id: int, reason: str) -> StepOutput | None:
        """Finishes a waiting or running sequence now and frees its blocks."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self._finish(seq, reason)
                    return StepOutput(seq_id, [], reason)
        return None

    def schedule(self) -> SchedulerOutput | None:
        if self.limits.chunked_prefill:
            return self._schedule_chunked()
        if self.waiting and self._batch_has_room():
            admitted = self._admit(self._min_new_sequences())
            if admitted:
                self.steps_since_prefill = 0
                return SchedulerOutput(admitted, is_prefill=True)
        if self.running:
            self._reserve_decode_slots()
        decoding = [s for s in self.running if not s.is_ending]
        if decoding:
            self.steps_since_prefill += 1
            return SchedulerOutput(decoding, is_prefill=False)
        return None

    def advance(self, out: SchedulerOutput) -> AdvancedStep:
        """Counts a launched step's tokens as computed, and gives each sequence it completes a
        PENDING_TOKEN for the token it samples, so that the next step can be scheduled before
        that token is read (engine/async_steps.py)."""
        completes = out.completes()
        pending = []
        for seq, count, done in zip(out.seqs, out.num_new_tokens, completes):
            seq.num_computed_tokens += count
            pending.append(len(seq.output_ids) if done else -1)
            if done:
                seq.output_ids.append(PENDING_TOKEN)
        return AdvancedStep(completes, pending)

    def resolve(self, out: SchedulerOutput, advanced: AdvancedStep, sampled: SampleOutput,
                prompt_logprobs: dict[int, list[TokenLogprob | None]] | None = None,
                next_drafts: list[list[int]] | None = None) -> list[StepOutput]:
        """Puts each completed sequence's sampled tokens in place of its pending one and
        finishes those that are done; sequences finished meanwhile (aborted, or by the step
        before when this one was launched ahead) are skipped.
        sampled has one row per sequence that completes, or 1 + its drafts rows for one with
        drafts: the drafts equal to the tokens sampled before them are kept, then the first
        sampled token after them. next_drafts: drafts proposed at each sampled row (Medusa)."""
        outputs = []
        for seq, done in zip(out.seqs, advanced.completes):
            if not done and seq.status is SequenceStatus.RUNNING:
                self.block_manager.commit(seq)  # a prefill chunk: its prompt goes on later
        row = 0
        for seq, drafts, done, index in zip(out.seqs, out.drafts, advanced.completes,
                                            advanced.pending):
            if not done:
                continue
            first_row, row = row, row + 1 + len(drafts)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            # a step launched ahead of this one's reading appended its own pending token
            later = seq.output_ids[index + 1:]
            del seq.output_ids[index:]
            output = self._accept(seq, drafts, sampled, range(first_row, row))
            if output.finish_reason == "error":
                outputs.append(output)
                continue
            if not output.finish_reason:
                seq.output_ids += later
            if drafts:  # the KV of rejected drafts is not the sequence's
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            if next_drafts is not None:
                seq.next_drafts = next_drafts[first_row + len(output.new_token_ids) - 1]
            self.block_manager.commit(seq)
            if output.finish_reason:
                self.running.remove(seq)
                self._finish(seq, output.finish_reason)
            elif drafts:
                self.block_manager.trim(seq)  # frees the blocks that only rejected drafts used
            if prompt_logprobs and seq.seq_id in prompt_logprobs:
                output.prompt_logprobs = prompt_logprobs[seq.seq_id]
            if index == 0:  # its first tokens
                output.scheduled_at = seq.scheduled_at
                output.num_cached_tokens = seq.num_cached_tokens
            outputs.append(output)
        return outputs

    def decode_slots_fit(self) -> bool:
        """Whether the next step can give every running sequence a slot for its next token
        without preempting one (a step launched ahead must not preempt: the sequences it would
        send back to the queue still wait for their pending token)."""
        needed = sum(self._needs_block(s) for s in self.running)
        return needed <= self.block_manager.num_free_blocks

    def _needs_block(self, seq: Sequence) -> bool:
        """Whether seq's next token needs a new KV block (a sequence ending with its pending
        token gets no next token)."""
        return not seq.is_ending and len(seq.block_ids) * self.block_manager.block_size \
            < seq.num_tokens

    def _accept(self, seq: Sequence, drafts: list[int], sampled: SampleOutput,
                rows: range) -> StepOutput:
        """Appends the tokens sampled at rows while they confirm the drafts, up to EOS or
        max_tokens (the output's finish_reason); a grammar dead end finishes seq with an error."""
        output = StepOutput(seq.seq_id, [], None)
        if seq.track_logprobs:
            output.logprobs = []
        for j, row in enumerate(rows):
            token = sampled.token_ids[row]
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                # nothing the grammar allowed survived the other constraints (min_tokens' EOS
                # ban at a complete grammar, bad words): say so rather than emit a wrong token
                self.running.remove(seq)
                self._finish(seq, "error")
                return StepOutput(seq.seq_id, [], "error", (
                    f"the grammar allows no token here that the other parameters allow "
                    f"(min_tokens, bad_words?): {seq.matcher.get_error() or 'token rejected'}"))
            seq.output_ids.append(token)
            output.new_token_ids.append(token)
            if seq.track_logprobs:
                output.logprobs.append(_token_logprob(sampled, row, seq.details.top_n_tokens))
            if token in self.eos_token_ids and (not seq.stopping.ignore_eos or seq.matcher):
                output.finish_reason = "eos_token"  # a completed grammar ends it past ignore_eos
            elif len(seq.output_ids) >= seq.stopping.max_tokens:
                output.finish_reason = "length"
            if output.finish_reason or j == len(drafts) or token != drafts[j]:
                break
        return output

    # --- internals -------------------------------------------------------------------------

    def _batch_cap(self) -> float:
        """Most running sequences: --max-batch-size, and the cap an out-of-memory step set."""
        return min(self.limits.max_batch_size or math.inf, self.oom_batch_cap or math.inf)

    def _batch_has_room(self) -> bool:
        return len(self.running) < self._batch_cap()

    def shrink_after_oom(self, seqs: list[Sequence]) -> int:
        """A step of seqs ran out of device memory: the newest half of them go back to the
        queue (their KV freed, recomputed later) and the batch is capped at what is left until
        steps succeed again (Engine). Returns how many were preempted."""
        newest = [s for s in reversed(self.running) if s in seqs][:len(seqs) // 2]
        for seq in newest:
            self.running.remove(seq)
            self._preempt(seq)
        self.oom_batch_cap = max(1, len(self.running))
        return len(newest)

    def _min_new_sequences(self) -> int:
        if not self.running or self.steps_since_prefill >= self.limits.max_waiting_tokens:
            return 1
        return max(1, math.floor(len(self.running) * self.limits.waiting_served_ratio))

    def _schedule_chunked(self) -> SchedulerOutput | None:
        """Every decoding sequence's next token, then prefill chunks up to
        max_batch_prefill_tokens: sequences part-way through their prompt first, then waiting
        ones while the budget lasts. Running streams get a token every step, so waiting
        prompts need not be held back to be prefilled together (TGI's waiting_served_ratio and
        max_waiting_tokens apply without chunked prefill)."""
        if self.running:
            self._reserve_decode_slots()
        seqs = [s for s in self.running if s.is_decoding and not s.is_ending]
        counts = [1] * len(seqs)
        budget = self.limits.max_batch_prefill_tokens
        for seq in [s for s in self.running if not s.is_decoding]:
            if budget <= 0:
                break
            seqs.append(seq)
            counts.append(self._chunk(seq, budget))
            budget -= counts[-1]
        admitted = []
        if self.waiting and budget > 0 and self._batch_has_room():
            admitted = self._admit(1, budget)
        for seq in admitted:
            seqs.append(seq)
            counts.append(self._chunk(seq, budget))
            budget -= counts[-1]
        if not seqs:
            return None
        return SchedulerOutput(seqs, not all(s.is_decoding for s in seqs), counts)

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens of seq's prompt to compute now: what the budget allows, or all of them for a
        prompt that wants its tokens' details (they come from one pass)."""
        needed = seq.num_tokens - seq.num_computed_tokens
        if seq.details.input_details and not seq.input_details_done:
            return needed
        return min(needed, budget)

    def _admit(self, min_new: int, chunk_budget: int | None = None) -> list[Sequence]:
        """Takes waiting sequences in order while they fit; all or nothing w.r.t. min_new.
        chunk_budget: chunked prefill's tokens left in this step (a prompt may take part of
        it); without it a prompt is prefilled whole within max_batch_prefill_tokens."""
        token_budget = chunk_budget or self.limits.max_batch_prefill_tokens
        free_blocks = self.block_manager.num_free_blocks
        room = self._batch_cap() - len(self.running)
        chosen: list[Sequence] = []
        bm = self.block_manager
        for seq in self.waiting:
            if len(chosen) >= room:
                break
            if seq.adapter is not None and not self.adapters.ready(seq.adapter):
                continue  # its adapter is loading: the ones behind it may go first
            if seq.prefix is not None and seq.prefix_embeddings is None and \
                    not self.prompts.ready(seq.prefix):
                continue  # its soft prompt is loading
            if seq.grammar is not None and seq.matcher is None and \
                    not self.grammars.ready(seq.grammar):
                continue  # its grammar is compiling
            hits = bm.cached_prefix(seq)
            new_tokens = seq.num_tokens - len(hits) * bm.block_size
            if chunk_budget is not None:
                if token_budget <= 0:
                    break
                new_tokens = min(new_tokens, token_budget)
            elif chosen and new_tokens > token_budget:
                self.num_prefill_limit_hits += 1
                break
            # Room for the prompt and the first decoded token, so it is not preempted at once.
            if bm.blocks_needed(seq, hits, extra_tokens=1) > free_blocks:
                break
            chosen.append(seq)
            token_budget -= new_tokens
            free_blocks -= bm.blocks_needed(seq, hits)
        if len(chosen) < min_new:
            return []
        now = time.monotonic()
        for seq in chosen:
            self.waiting.remove(seq)
            self.block_manager.allocate(seq)
            if seq.adapter is not None:
                seq.adapter_slot = self.adapters.acquire(seq.adapter)
            if seq.prefix is not None and seq.prefix_embeddings is None:
                seq.prefix_embeddings = self.prompts.take(seq.prefix)
            if seq.grammar is not None and seq.matcher is None:
                seq.matcher = self.grammars.matcher(seq.grammar)
            seq.status = SequenceStatus.RUNNING
            if seq.scheduled_at is None:  # a preempted sequence keeps its first admission
                seq.scheduled_at = now
            self.running.append(seq)
        return chosen

    def _reserve_decode_slots(self) -> None:
        """Gives every running sequence a slot for its next token, preempting the newest."""
        kept: list[Sequence] = []
        pending = deque(self.running)
        bm = self.block_manager
        while pending:
            seq = pending.popleft()
            if not self._needs_block(seq):
                kept.append(seq)
                continue
            while not bm.can_append(seq):
                victim = pending.pop() if pending else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.append_slot(seq)
                kept.append(seq)
        self.running = kept

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot >= 0:
            self.adapters.release(seq.adapter)
            seq.adapter_slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.block_manager.free(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _token_logprob(sampled: SampleOutput, row: int, top_n: int) -> TokenLogprob:
    top = []
    if top_n:
        top = list(zip(sampled.top_ids[row][:top_n], sampled.top_logprobs[row][:top_n]))
    return TokenLogprob(sampled.logprobs[row], sampled.ranks[row], top)
