"""Batched token selection: one pass over the batch's logits, per-sequence parameters as tensors.

Randomness comes from a counter-based hash of (seed, step, token id), so a seeded sequence draws
the same numbers whatever else shares its batch, on any device, and after a preemption.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from textgen_backend.sequence import Sequence

_M32 = 0xFFFFFFFF


@dataclass
class RandomSampling:
    """Parameters of the sampled (non-greedy) rows of a batch, as device tensors [B]."""
    do_sample: torch.Tensor            # bool; greedy rows keep their argmax
    temperature: torch.Tensor          # float32, 1 where greedy
    top_k: torch.Tensor                # int64, vocab size where disabled
    top_p: torch.Tensor                # float32
    seed_lo: torch.Tensor              # int64, low and high 32 bits of the seed
    seed_hi: torch.Tensor
    step: torch.Tensor                 # int64, index of the token being sampled
    any_top_k: bool
    any_top_p: bool


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
    with no penalties is a bare argmax, with nothing copied to the device)."""
    random: RandomSampling | None
    suppress_eos: torch.Tensor | None  # [B] bool: min_tokens not reached yet
    eos_token_ids: torch.Tensor | None # [num_eos] int64
    penalties: PenaltyBatch | None


def build_sampling_batch(seqs: list[Sequence], eos_token_ids: tuple[int, ...], vocab_size: int,
                         device: torch.device) -> SamplingBatch:
    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    suppress = [len(s.output_ids) < s.stopping.min_tokens and not s.stopping.ignore_eos
                for s in seqs]
    suppressing = any(suppress) and bool(eos_token_ids)
    return SamplingBatch(
        random=_build_random(seqs, vocab_size, tensor),
        suppress_eos=tensor(suppress, torch.bool) if suppressing else None,
        eos_token_ids=tensor(list(eos_token_ids), torch.int64) if suppressing else None,
        penalties=_build_penalties(seqs, vocab_size, device),
    )


def _build_random(seqs: list[Sequence], vocab_size: int, tensor) -> RandomSampling | None:
    params = [s.sampling for s in seqs]
    if not any(p.do_sample for p in params):
        return None
    top_k = [p.top_k if p.do_sample and p.top_k > 0 else vocab_size for p in params]
    top_p = [p.top_p if p.do_sample else 1.0 for p in params]
    return RandomSampling(
        do_sample=tensor([p.do_sample for p in params], torch.bool),
        temperature=tensor([p.temperature if p.do_sample else 1.0 for p in params], torch.float32),
        top_k=tensor(top_k, torch.int64),
        top_p=tensor(top_p, torch.float32),
        seed_lo=tensor([p.seed & _M32 for p in params], torch.int64),
        seed_hi=tensor([p.seed >> 32 for p in params], torch.int64),
        step=tensor([len(s.output_ids) for s in seqs], torch.int64),
        any_top_k=any(k < vocab_size for k in top_k),
        any_top_p=any(p < 1.0 for p in top_p),
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
        return ids.to(device, non_blocking=True)

    def counts(lists):
        # One spare column absorbs the padding id, then is dropped.
        ids = padded(lists)
        table = torch.zeros(batch, vocab_size + 1, device=device)
        table.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
        return table[:, :vocab_size]

    return PenaltyBatch(
        repetition=torch.tensor([s.sampling.repetition_penalty for s in seqs]).to(device),
        presence=torch.tensor([s.sampling.presence_penalty for s in seqs]).to(device),
        frequency=torch.tensor([s.sampling.frequency_penalty for s in seqs]).to(device),
        prompt_mask=counts([s.prompt_ids for s in seqs]) > 0,
        output_counts=counts([s.output_ids for s in seqs]),
    )


def apply_penalties(logits: torch.Tensor, p: PenaltyBatch) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (HF semantics); presence and frequency
    penalties over output tokens only (OpenAI / vLLM semantics)."""
    seen = p.prompt_mask | (p.output_counts > 0)
    rep = p.repetition[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - p.frequency[:, None] * p.output_counts
    return logits - p.presence[:, None] * (p.output_counts > 0).float()


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [B, V] float32 -> token ids [B] int64."""
    if batch.suppress_eos is not None:
        eos_mask = torch.zeros_like(logits, dtype=torch.bool)
        eos_mask[:, batch.eos_token_ids] = True
        logits = logits.masked_fill(eos_mask & batch.suppress_eos[:, None], float("-inf"))
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    greedy = logits.argmax(dim=-1)
    r = batch.random
    if r is None:
        return greedy
    scaled = logits / r.temperature[:, None]
    if r.any_top_k or r.any_top_p:
        scaled = _mask_top_k_top_p(scaled, r)
    probs = torch.softmax(scaled, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (Gumbel-max in disguise).
    exponential = -torch.log(_uniform(r, logits.shape[1], logits.device))
    sampled = (probs / exponential).argmax(dim=-1)
    return torch.where(r.do_sample, sampled, greedy)


def _mask_top_k_top_p(logits: torch.Tensor, batch: RandomSampling) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    remove = rank >= batch.top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Drop a token once the tokens ranked before it already reach top_p (the top one stays).
    remove |= (probs.cumsum(dim=-1) - probs) >= batch.top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


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
    return (bits.float() + 0.5) / float(1 << 24)
