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
    engine = Engine(EngineConfig(model_id=str(model_dir), max_input_tokens=50,
                                 max_total_tokens=200), model_dir)
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
