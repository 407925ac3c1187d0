"""Token selection for a step: logits processors and sampling over the whole batch at once,
per-sequence parameters as tensors, plus the logprob details requests ask for.

Randomness comes from a counter-based hash of (seed, step, token id), so a seeded sequence draws
the same numbers whatever else shares its batch, on any device, and after a preemption.
Reported logprobs are those of the model's own distribution (log_softmax of the raw logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from textgen_backend.sampling import logits_processors as lp

if TYPE_CHECKING:  # the engine's sequences are read here, never imported at run time
    from textgen_backend.engine.sequence import Sequence

_M32 = 0xFFFFFFFF


@dataclass
class RandomSampling:
    """Parameters of the sampled (non-greedy) rows of a batch, as device tensors [B]."""
    do_sample: torch.Tensor            # bool; greedy rows keep their argmax
    temperature: torch.Tensor          # float32, 1 where greedy
    top_k: torch.Tensor                # int64, vocab size where disabled
    top_p: torch.Tensor                # float32, 1 where disabled
    min_p: torch.Tensor                # float32, 0 where disabled
    typical_p: torch.Tensor            # float32, 1 where disabled
    seed_lo: torch.Tensor              # int64, low and high 32 bits of the seed
    seed_hi: torch.Tensor
    step: torch.Tensor                 # int64, index of the token being sampled
    any_top_k_p: bool
    any_min_p: bool
    any_typical: bool


@dataclass
class PenaltyBatch:
    repetition: torch.Tensor           # [B] float32
    presence: torch.Tensor             # [B] float32
    frequency: torch.Tensor            # [B] float32
    prompt_mask: torch.Tensor          # [B, V] bool: token occurs in the prompt
    output_counts: torch.Tensor        # [B, V] float32: occurrences among generated tokens


@dataclass
class SamplingBatch:
    """What a step's token selection needs; parts no row uses are None (an all-greedy batch
    with no processors is a bare argmax, with nothing copied to the device)."""
    banned: tuple[torch.Tensor, torch.Tensor] | None     # (rows, tokens) set to -inf
    penalties: PenaltyBatch | None
    length_penalty: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # over, decay, eos
    watermark: tuple[list[int], list[int], float, float] | None  # rows, previous tokens, gamma, delta
    random: RandomSampling | None
    top_n: int                          # most alternatives any row asked for
    logprobs: bool                      # some row wants logprobs / ranks / top-n


@dataclass
class SampleOutput:
    """Chosen tokens and, when asked, their details (host lists, one entry per row)."""
    token_ids: list[int]
    logprobs: list[float] | None = None
    ranks: list[int] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def build_sampling_batch(seqs: list[Sequence], eos_token_ids: tuple[int, ...], vocab_size: int,
                         device: torch.device, watermark_gamma: float = 0.5,
                         watermark_delta: float = 2.0) -> SamplingBatch:
    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    watermarked = [row for row, s in enumerate(seqs) if s.sampling.watermark]
    return SamplingBatch(
        banned=_banned_tokens(seqs, eos_token_ids, tensor),
        penalties=_build_penalties(seqs, vocab_size, device),
        length_penalty=_length_penalty(seqs, eos_token_ids, tensor),
        watermark=((watermarked, [seqs[r].last_token for r in watermarked],
                    watermark_gamma, watermark_delta) if watermarked else None),
        random=_build_random(seqs, vocab_size, tensor),
        top_n=max(s.details.top_n_tokens for s in seqs),
        logprobs=any(s.track_logprobs for s in seqs),
    )


def _banned_tokens(seqs, eos_token_ids, tensor):
    """(rows, tokens) never to choose: EOS before min_tokens, bad words whose prefix is there."""
    rows, tokens = [], []
    for row, s in enumerate(seqs):
        if eos_token_ids and len(s.output_ids) < s.stopping.min_tokens and not s.stopping.ignore_eos:
            rows += [row] * len(eos_token_ids)
            tokens += eos_token_ids
        for word in s.sampling.bad_words_ids:
            prefix = list(word[:-1])
            if not prefix or s.all_ids[-len(prefix):] == prefix:
                rows.append(row)
                tokens.append(word[-1])
    return (tensor(rows, torch.int64), tensor(tokens, torch.int64)) if rows else None


def _length_penalty(seqs, eos_token_ids, tensor):
    if not eos_token_ids or not any(s.sampling.length_penalty for s in seqs):
        return None
    over, decay = [], []
    for s in seqs:
        start, factor = s.sampling.length_penalty or (0, 1.0)
        suppressed = len(s.output_ids) < s.stopping.min_tokens and not s.stopping.ignore_eos
        # HF counts the token being chosen: cur_len - (prompt + start) = generated - start.
        over.append(0 if suppressed else len(s.output_ids) - start)
        decay.append(factor)
    return (tensor(over, torch.int64), tensor(decay, torch.float32),
            tensor(list(eos_token_ids), torch.int64))


def _build_random(seqs: list[Sequence], vocab_size: int, tensor) -> RandomSampling | None:
    params = [s.sampling for s in seqs]
    if not any(p.do_sample for p in params):
        return None
    top_k = [p.top_k if p.do_sample and p.top_k > 0 else vocab_size for p in params]
    top_p = [p.top_p if p.do_sample else 1.0 for p in params]
    min_p = [p.min_p if p.do_sample else 0.0 for p in params]
    typical_p = [p.typical_p if p.do_sample else 1.0 for p in params]
    return RandomSampling(
        do_sample=tensor([p.do_sample for p in params], torch.bool),
        temperature=tensor([p.temperature if p.do_sample else 1.0 for p in params], torch.float32),
        top_k=tensor(top_k, torch.int64),
        top_p=tensor(top_p, torch.float32),
        min_p=tensor(min_p, torch.float32),
        typical_p=tensor(typical_p, torch.float32),
        seed_lo=tensor([p.seed & _M32 for p in params], torch.int64),
        seed_hi=tensor([p.seed >> 32 for p in params], torch.int64),
        step=tensor([len(s.output_ids) for s in seqs], torch.int64),
        any_top_k_p=any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p),
        any_min_p=any(m > 0 for m in min_p),
        any_typical=any(t < 1.0 for t in typical_p),
    )


def _build_penalties(seqs: list[Sequence], vocab_size: int,
                     device: torch.device) -> PenaltyBatch | None:
    if not any(s.sampling.has_penalties for s in seqs):
        return None
    batch = len(seqs)

    def padded(lists):
        width = max(1, max(len(x) for x in lists))
        ids = torch.full((batch, width), vocab_size, dtype=torch.int64)  # vocab_size = padding
        for row, values in enumerate(lists):
            ids[row, :len(values)] = torch.tensor(values, dtype=torch.int64)
        # a token still pending (async scheduling) counts as padding here; the engine adds it
        # on the device (engine/async_steps.py count_pending)
        ids[ids < 0] = vocab_size
        return ids.to(device, non_blocking=True)

    def parameter(values):
        # non_blocking: a blocking copy would wait for a step launched before (async scheduling)
        return torch.tensor(values).to(device, non_blocking=True)

    def counts(lists):
        # One spare column absorbs the padding id, then is dropped.
        ids = padded(lists)
        table = torch.zeros(batch, vocab_size + 1, device=device)
        table.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
        return table[:, :vocab_size]

    return PenaltyBatch(
        repetition=parameter([s.sampling.repetition_penalty for s in seqs]),
        presence=parameter([s.sampling.presence_penalty for s in seqs]),
        frequency=parameter([s.sampling.frequency_penalty for s in seqs]),
        prompt_mask=counts([s.prompt_ids for s in seqs]) > 0,
        output_counts=counts([s.output_ids for s in seqs]),
    )


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The logits processors, in transformers' order: penalties, bad words and min_tokens,
    length penalty, watermark (temperature and the truncations follow in sample())."""
    if batch.penalties is not None:
        p = batch.penalties
        logits = lp.apply_penalties(logits, p.repetition, p.presence, p.frequency,
                                    p.prompt_mask, p.output_counts)
    if batch.banned is not None:
        logits = lp.ban_tokens(logits, *batch.banned)
    if batch.length_penalty is not None:
        logits = lp.exponential_decay_length_penalty(logits, *batch.length_penalty)
    if batch.watermark is not None:
        logits = lp.watermark(logits, *batch.watermark)
    return logits


@dataclass
class DeviceSample:
    """A step's chosen tokens and details still on the device: start_copy() queues their copy
    to the host behind the step's kernels, fetch() waits for it (the step's only host sync)."""
    tokens: torch.Tensor               # [B] int64
    logprobs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    _host: list | None = None
    _copied: torch.cuda.Event | None = None

    def _parts(self) -> list[torch.Tensor | None]:
        return [self.tokens, self.logprobs, self.ranks, self.top_ids, self.top_logprobs]

    def start_copy(self) -> None:
        if self.tokens.device.type != "cuda":
            return
        # into pinned memory: a device-to-host copy to pageable memory would wait for the step
        self._host = [None if t is None else _pinned_like(t).copy_(t, non_blocking=True)
                      for t in self._parts()]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def fetch(self) -> SampleOutput:
        if self._copied is not None:
            self._copied.synchronize()
        parts = [None if t is None else t.tolist() for t in (self._host or self._parts())]
        return SampleOutput(*parts)


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
    """logits [B, V] float32 (the model's) -> chosen tokens and the details asked for."""
    return select(logits, batch).fetch()


def select(logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
    """sample(), its results left on the device."""
    raw = logits
    logits = process_logits(logits, batch)
    tokens = logits.argmax(dim=-1)
    r = batch.random
    if r is not None:
        scaled = lp.infinite_scores_win(logits / r.temperature[:, None])
        if r.any_top_k_p:
            scaled = lp.top_k_top_p(scaled, r.top_k, r.top_p)
        if r.any_min_p:
            scaled = lp.min_p(scaled, r.min_p)
        if r.any_typical:
            scaled = lp.typical(scaled, r.typical_p)
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (Gumbel-max in disguise).
        exponential = -torch.log(_uniform(r, logits.shape[1], logits.device))
        tokens = torch.where(r.do_sample, (probs / exponential).argmax(dim=-1), tokens)
    if not batch.logprobs:
        return DeviceSample(tokens)
    log_probs = torch.log_softmax(raw, dim=-1)
    chosen = log_probs.gather(1, tokens[:, None])[:, 0]
    ranks = (log_probs > chosen[:, None]).sum(dim=-1) + 1
    out = DeviceSample(tokens, chosen, ranks)
    if batch.top_n:
        top = log_probs.topk(batch.top_n, dim=-1)
        out.top_ids, out.top_logprobs = top.indices, top.values
    return out


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _uniform(batch: RandomSampling, vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] floats in (0, 1), a pure function of (seed, step, token id)."""
    key = _fmix32(batch.seed_lo ^ _fmix32(batch.seed_hi ^ 0x9E3779B9))
    key = _fmix32(key ^ ((batch.step * 0x632BE5AB) & _M32))[:, None]
    token = torch.arange(vocab, device=device, dtype=torch.int64)[None, :]
    bits = _fmix32(key ^ _fmix32(token + 0x7F4A7C15)) >> 8  # 24 random bits
    # In float32 the top value rounds to 1: the race's E = -log(1) = 0 would give p / 0 = inf,
    # and NaN for a token of probability 0 (banned or truncated), which argmax picks.
    return ((bits.float() + 0.5) / float(1 << 24)).clamp(max=1 - 2**-24)
