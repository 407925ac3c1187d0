"""Async scheduling (`--async-scheduling`, vLLM's name): the next step is scheduled and launched
while the device still runs the current one, so that the host's share of a step (scheduling,
step tensors, launches; then reading the sampled tokens, updating the sequences, sending the
outputs) overlaps the device's instead of leaving it idle between steps.

A step launched ahead takes the tokens that its sequences sampled in the step before from the
device: on the host such a token is PENDING_TOKEN until that step is read (Scheduler.advance,
then Scheduler.resolve). Sequences that the earlier step finishes (EOS) run one step for
nothing; those that reach max_tokens are not scheduled again. A step is launched ahead only when
nothing it decides depends on the pending tokens' values on the host: see
`Engine._can_look_ahead` and `reads_history`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from textgen_backend.engine.sequence import PENDING_TOKEN, Sequence


def to_device(values: np.ndarray | list[int], device: torch.device) -> torch.Tensor:
    """Small host integers on the device without waiting for the device's queued work (a
    blocking copy would wait for the step launched before, still running)."""
    return torch.as_tensor(values).to(device, non_blocking=True)


@dataclass
class TokenFeed:
    """A step's input tokens that are still on the device: rows of the step's packed tokens, and
    their rows among the previous step's sampled tokens."""
    rows: np.ndarray
    sources: np.ndarray

    @classmethod
    def of(cls, ids: list[int], cu_seqlens: np.ndarray, seqs: list[Sequence],
           sampled_row_of: dict[int, int]) -> TokenFeed | None:
        """The pending tokens among a step's packed ids; sampled_row_of: each sequence's row
        among the previous step's sampled tokens."""
        rows = np.flatnonzero(np.asarray(ids) == PENDING_TOKEN)
        if not len(rows):
            return None
        owners = np.searchsorted(cu_seqlens, rows, side="right") - 1
        return cls(rows, np.asarray([sampled_row_of[seqs[i].seq_id] for i in owners]))

    def values(self, sampled: torch.Tensor) -> torch.Tensor:
        """The tokens, gathered on the device as int32 (the step inputs' dtype)."""
        n = len(self.sources)
        if np.array_equal(self.sources, np.arange(n)):
            return sampled[:n].to(torch.int32)
        return sampled[to_device(self.sources, sampled.device)].to(torch.int32)


def write_rows(ids: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> None:
    """ids[rows] = values on the device; rows sorted and distinct (a slice for 0..n-1, a decode
    step's usual feed)."""
    n = len(rows)
    if rows[-1] == n - 1:
        ids[:n] = values
    else:
        ids[to_device(rows, ids.device)] = values


def count_pending(output_counts: torch.Tensor, seqs: list[Sequence], sampled: torch.Tensor,
                  sampled_row_of: dict[int, int]) -> None:
    """Adds each row's pending token, on the device, to the penalties' output counts (built on
    the host, where a pending token counts nowhere)."""
    rows = [r for r, s in enumerate(seqs) if s.output_ids and s.output_ids[-1] == PENDING_TOKEN]
    if not rows:
        return
    tokens = sampled[to_device([sampled_row_of[seqs[r].seq_id] for r in rows], sampled.device)]
    output_counts[to_device(rows, output_counts.device), tokens] += 1


def reads_history(seq: Sequence) -> bool:
    """Whether sampling seq's next token reads its earlier tokens' values on the host (bad words
    after a prefix, the watermark's previous token, a grammar's state), not only their count
    (penalties count a pending token on the device: count_pending)."""
    p = seq.sampling
    return (p.watermark or seq.matcher is not None
            or any(len(word) > 1 for word in p.bad_words_ids))
