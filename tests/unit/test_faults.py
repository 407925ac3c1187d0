"""engine/faults.py: the injection spec, and the out-of-memory batch cap that a run of good steps
lifts again (engine on the CPU, tiny model; the server tests are tests/e2e/test_faults_server.py)."""
from __future__ import annotations

import pytest
import torch

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.faults import OOM_CAP_STEPS, FaultInjector
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


def test_the_spec_names_steps_and_periods():
    faults = FaultInjector("raise@2,oom%3,sleep@4:0.01")
    outcomes = []
    for _ in range(6):
        try:
            faults.before_forward()
            outcomes.append("ok")
        except torch.cuda.OutOfMemoryError:
            outcomes.append("oom")
        except RuntimeError:
            outcomes.append("raise")
    assert outcomes == ["ok", "raise", "oom", "ok", "ok", "oom"]
    for bad in ("explode@3", "raise@0", "raise@x", "oom"):
        with pytest.raises(ValueError, match="TEXTGEN_FAULT_INJECTION"):
            FaultInjector(bad)


def test_an_oom_cap_shrinks_the_batch_then_lifts(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_FAULT_INJECTION", "oom@2")
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    # steps read one by one (a step launched ahead that fails: test_async_scheduling)
    engine = Engine(EngineConfig(model_id=str(model_dir), max_input_tokens=50,
                                 max_total_tokens=200, async_scheduling=False), model_dir)
    seqs = [Sequence(i, [5 + i, 6, 7], SamplingParams(),
                     StoppingParams(max_tokens=OOM_CAP_STEPS + 40, ignore_eos=True))
            for i in range(4)]
    for seq in seqs:
        engine.add(seq)
    engine.step()
    engine.step()                                  # out of memory: 2 of 4 wait
    assert engine.last_step.failure == "oom"
    assert engine.scheduler.oom_batch_cap == 2 and len(engine.scheduler.running) == 2
    for _ in range(5):
        engine.step()
    assert len(engine.scheduler.running) == 2      # the cap holds
    for _ in range(OOM_CAP_STEPS):
        engine.step()
    assert engine.scheduler.oom_batch_cap is None  # lifted: 2 x 2 covers every sequence
    while engine.has_work():
        engine.step()
    assert all(len(s.output_ids) == OOM_CAP_STEPS + 40 for s in seqs)


def test_under_sustained_overload_every_admitted_request_finishes_within_its_bound(tmp_path):
    """Two new requests a step for 60 steps against a KV cache that holds about three: the
    oldest running sequence is never the one preempted and a preempted one goes back to the
    front of the queue, so a request admitted with k older ones unfinished finishes within
    (k + 1) x the longest request's steps alone. Measured here (and quoted in the docs)."""
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    engine = Engine(EngineConfig(model_id=str(model_dir), block_size=4, max_input_tokens=24,
                                 max_total_tokens=64, max_batch_total_tokens=96), model_dir)
    longest_alone = 32 + 1                          # max_tokens decodes + one recompute prefill
    seqs, admitted_at, older_at_admission, finished_at = [], {}, {}, {}
    step = 0
    while step < 60 or engine.has_work():
        if step < 60:
            for _ in range(2):
                n = len(seqs)
                seqs.append(Sequence(n, [3 + n % 50] * (4 + n % 17), SamplingParams(),
                                     StoppingParams(max_tokens=8 + n % 25, ignore_eos=True)))
                engine.add(seqs[-1])
        engine.step()
        step += 1
        for seq in seqs:
            if seq.seq_id not in admitted_at and seq.scheduled_at is not None:
                admitted_at[seq.seq_id] = step
                older_at_admission[seq.seq_id] = sum(
                    1 for other in admitted_at if other != seq.seq_id
                    and other not in finished_at)
            if seq.seq_id not in finished_at and seq.finish_reason is not None:
                finished_at[seq.seq_id] = step
        assert step < 5000, "the engine stopped making progress"
    assert engine.scheduler.num_preemptions > 20           # it was overloaded
    assert all(len(s.output_ids) == s.stopping.max_tokens for s in seqs)
    worst = max((finished_at[i] - admitted_at[i]) / ((older_at_admission[i] + 1) * longest_alone)
                for i in finished_at)
    assert worst <= 1.0, worst
    steps_in_flight = [finished_at[i] - admitted_at[i] for i in finished_at]
    print(f"\n{len(seqs)} requests, {engine.scheduler.num_preemptions} preemptions, steps from "
          f"admission to finish: max {max(steps_in_flight)}, mean "
          f"{sum(steps_in_flight) / len(steps_in_flight):.1f}; worst fraction of its bound "
          f"{worst:.2f}")
