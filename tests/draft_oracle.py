"""Drafts that land on a random model, which never repeats itself: the reference continuation
of whichever history a draft extends, every third step's last draft wrong (so rejection and the
correction token are exercised too)."""
from __future__ import annotations

import textgen_backend.speculation.speculator as speculator_module


def oracle_drafts(monkeypatch, continuations: list[list[int]]) -> None:
    """The n-gram proposer replaced by the oracle over `continuations` (prompt + reference)."""
    def propose(histories, num_drafts):
        drafts = []
        for history in histories:
            full = next((c for c in continuations if c[:len(history)] == history), [])
            draft = full[len(history):len(history) + num_drafts]
            if draft and len(history) % 3 == 0:
                draft[-1] = (draft[-1] + 1) % 300
            drafts.append(draft)
        return drafts
    monkeypatch.setattr(speculator_module, "propose_ngram", propose)
