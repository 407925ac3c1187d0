"""Batched logits transforms, one pass for the whole batch with per-row parameters as tensors.

Each follows a Hugging Face transformers logits processor (named in its docstring; the unit
tests compare them on the same logits). Rows whose parameter disables a transform pass through
unchanged. logits: [B, V] float32.
"""
from __future__ import annotations

import torch

_NEG_INF = float("-inf")
WATERMARK_HASH_KEY = 15485863  # TGI's (and Kirchenbauer et al.'s) key


def ban_tokens(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits[rows[i], tokens[i]] = -inf: EOS before min_tokens (MinNewTokensLengthLogitsProcessor)
    and bad words (NoBadWordsLogitsProcessor)."""
    logits = logits.clone()
    logits[rows, tokens] = _NEG_INF
    return logits


def apply_penalties(logits: torch.Tensor, repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, prompt_mask: torch.Tensor,
                    output_counts: torch.Tensor) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (RepetitionPenaltyLogitsProcessor);
    presence and frequency penalties over output tokens (OpenAI / vLLM semantics).
    prompt_mask [B, V] bool, output_counts [B, V] float."""
    seen = prompt_mask | (output_counts > 0)
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency[:, None] * output_counts
    return logits - presence[:, None] * (output_counts > 0).float()


def exponential_decay_length_penalty(logits: torch.Tensor, over: torch.Tensor,
                                     decay: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """TGIS length penalty (ExponentialDecayLengthPenalty): once a row has generated `over` > 0
    tokens past its start index, its EOS scores grow by |score| * (decay**over - 1).
    over [B] (<= 0: untouched), decay [B]. Rows whose factor is 0 and non-finite scores (EOS
    banned by min_tokens or bad words) are left as they are, as transformers does: -inf + inf
    and -inf * 0 would be NaN, which argmax picks."""
    factor = torch.where(over > 0, decay.pow(over.clamp(min=0).float()) - 1, 0.0)  # [B]
    # decay**over overflows float32 on long outputs; a finite cap keeps a 0 score at 0.
    factor = factor.clamp(max=torch.finfo(logits.dtype).max)[:, None]
    eos = logits[:, eos_ids]
    penalised = eos.isfinite() & (factor != 0)
    logits = logits.clone()
    logits[:, eos_ids] = torch.where(penalised, eos + eos.abs() * factor, eos)
    return logits


def watermark(logits: torch.Tensor, rows: list[int], previous_tokens: list[int], gamma: float,
              delta: float) -> torch.Tensor:
    """TGI's WatermarkLogitsProcessor: +delta on a green list of gamma x vocab tokens drawn by
    torch.randperm seeded with the previous token. One randperm per watermarked row: TGI's
    watermark detector reproduces exactly this generator, so it is kept, not batched."""
    logits = logits.clone()
    vocab = logits.shape[1]
    generator = torch.Generator(device=logits.device)
    for row, previous in zip(rows, previous_tokens):
        generator.manual_seed(WATERMARK_HASH_KEY * previous)
        green = torch.randperm(vocab, generator=generator, device=logits.device)
        logits[row, green[:int(vocab * gamma)]] += delta
    return logits


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """TopKLogitsWarper then TopPLogitsWarper. top_k [B] (vocab size: off), top_p [B] (1: off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    remove = rank >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, _NEG_INF), dim=-1)
    # Drop a token once the tokens ranked before it already reach top_p (the top one stays).
    # Rows at top_p 1 skip it: a float32 cumsum can reach 1 before the tail of the vocab.
    remove |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(remove, _NEG_INF))


def infinite_scores_win(logits: torch.Tensor) -> torch.Tensor:
    """Rows holding +inf scores (an overflowed length penalty, a tiny temperature) become
    softmax's limit: their +inf tokens tie at 0 and the others drop to -inf. Softmax itself
    would compute inf - inf = NaN for the whole row."""
    pos_inf = logits.isposinf()
    return torch.where(pos_inf.any(dim=-1, keepdim=True),
                       torch.where(pos_inf, 0.0, _NEG_INF), logits)


def min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """MinPLogitsWarper: drop tokens less likely than min_p x the top token's probability.
    min_p [B] (0: off)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, _NEG_INF)  # the top token always stays


def typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """TypicalLogitsWarper: keep the tokens whose surprisal is closest to the entropy until
    their probability reaches `mass`. mass [B] (1: off)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(dim=-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_shifted, order = shifted.sort(dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp(max=logits.shape[1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    remove_sorted[:, 0] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove & (mass[:, None] < 1), _NEG_INF)
