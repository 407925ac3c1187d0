"""Async scheduling (`--async-scheduling`, vLLM's name): the next step is scheduled and launched
while the device still runs the current one, so that the host's share of a step (scheduling,
step tensors, launches; then reading the sampled tokens, updating the sequences, sending the
outputs) overlaps the device's instead of leaving it idle between steps.

A step launched ahead takes the tokens that its sequences sampled in the step before from the
device: on the host such a token is PENDING_TOKEN until that step is read (Scheduler.advance,
then Scheduler.resolve). Sequences that the earlier step finishes (EOS) run one step for
nothing; those that reach max_tokens are not scheduled again. A step is launched ahead only when
nothing it decides depends on the pending tokens' values: see `can_look_ahead`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from textgen_backend.engine.sequence import PENDING_TOKEN, Sequence


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
        # non_blocking: a blocking copy would wait for the step still running on the device
        index = torch.from_numpy(self.sources).to(sampled.device, non_blocking=True)
        return sampled[index].to(torch.int32)


def write_rows(ids: torch.Tensor, rows: np.ndarray, values: torch.Tensor) -> None:
    """ids[rows] = values on the device; rows sorted and distinct (a slice for 0..n-1, a decode
    step's usual feed)."""
    n = len(rows)
    if rows[-1] == n - 1:
        ids[:n] = values
    else:
        ids[torch.from_numpy(rows).to(ids.device, non_blocking=True)] = values


def count_pending(output_counts: torch.Tensor, seqs: list[Sequence], sampled: torch.Tensor,
                  sampled_row_of: dict[int, int]) -> None:
    """Adds each row's pending token, on the device, to the penalties' output counts (built on
    the host, where a pending token counts nowhere)."""
    rows = [r for r, s in enumerate(seqs) if s.output_ids and s.output_ids[-1] == PENDING_TOKEN]
    if not rows:
        return
    sources = torch.tensor([sampled_row_of[seqs[r].seq_id] for r in rows])
    tokens = sampled[sources.to(sampled.device, non_blocking=True)]
    output_counts[torch.tensor(rows).to(output_counts.device, non_blocking=True), tokens] += 1


def reads_history(seq: Sequence) -> bool:
    """Whether sampling seq's next token reads its earlier tokens' values on the host (bad words
    after a prefix, the watermark's previous token, a grammar's state), not only their count
    (penalties count a pending token on the device: count_pending)."""
    p = seq.sampling
    return (p.watermark or seq.matcher is not None
            or any(len(word) > 1 for word in p.bad_words_ids))
