"""Greedy parity helpers for the GPU tests: the top 5 token ids of every row the engine samples
(recorded by patching the model runner's sampling), and where two greedy outputs first part."""
from __future__ import annotations

from textgen_backend.engine import model_runner


def record_top5(monkeypatch) -> dict[int, list[list[int]]]:
    """{seq_id: top-5 ids at each sampled step}, filled as the engine runs."""
    recorded: dict[int, list[list[int]]] = {}
    real_sample, real_execute = model_runner.sample, model_runner.ModelRunner.execute

    def recording_sample(logits, batch, *args, **kwargs):
        for seq, row in zip(recording_sample.seqs, logits.topk(5, dim=-1).indices.tolist()):
            recorded.setdefault(seq.seq_id, []).append(row)
        return real_sample(logits, batch, *args, **kwargs)

    def execute(self, out):
        recording_sample.seqs = out.seqs
        return real_execute(self, out)

    monkeypatch.setattr(model_runner, "sample", recording_sample)
    monkeypatch.setattr(model_runner.ModelRunner, "execute", execute)
    return recorded


def first_mismatch(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
