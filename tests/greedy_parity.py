"""Greedy parity helpers for the GPU tests: the top 5 token ids of every row the engine samples
(recorded by patching the model runner's sampling), and where two greedy outputs first part."""
from __future__ import annotations

from textgen_backend.engine import model_runner


def record_top5(monkeypatch) -> dict[int, list[list[int]]]:
    """{seq_id: top-5 ids at each sampled step}, filled as the engine runs."""
    recorded: dict[int, list[list[int]]] = {}
    real_select, real_launch = model_runner.select, model_runner.ModelRunner.launch

    def recording_select(logits, batch, *args, **kwargs):
        for seq, row in zip(recording_select.seqs, logits.topk(5, dim=-1).indices.tolist()):
            recorded.setdefault(seq.seq_id, []).append(row)
        return real_select(logits, batch, *args, **kwargs)

    def launch(self, out, *args, **kwargs):
        recording_select.seqs = [s for s, done in zip(out.seqs, out.completes()) if done]
        return real_launch(self, out, *args, **kwargs)

    monkeypatch.setattr(model_runner, "select", recording_select)
    monkeypatch.setattr(model_runner.ModelRunner, "launch", launch)
    return recorded


def first_mismatch(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
