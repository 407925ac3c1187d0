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


def medusa_oracle(monkeypatch, continuations: list[list[int]]) -> None:
    """Medusa's proposals (each sequence's next_drafts, from its heads) replaced by the same
    oracle just before the speculator reads them."""
    from textgen_backend.speculation.speculator import Speculator

    oracle_drafts(monkeypatch, continuations)
    attach = Speculator.attach

    def attach_with_oracle(self, out):
        for seq in out.seqs:
            seq.next_drafts = speculator_module.propose_ngram([seq.all_ids], self.num_drafts)[0]
        return attach(self, out)
    monkeypatch.setattr(Speculator, "attach", attach_with_oracle)
