"""What the engine reports for metrics: each step's StepStats and the statistics after it."""
import pytest

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.engine.sequence import Sequence
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


def test_step_stats_and_engine_statistics(tmp_path):
    model_dir = build_tiny_model(tmp_path / "tiny", "llama")
    # TGI's separate prefill and decode steps (chunked prefill's mixed steps: test_chunked_prefill),
    # each read before the next is scheduled (a step launched ahead: test_async_scheduling)
    engine = Engine(EngineConfig(model_id=str(model_dir), dtype="float32", max_total_tokens=64,
                                 max_batch_total_tokens=256, block_size=4,
                                 chunked_prefill=False, async_scheduling=False), model_dir)
    a = Sequence(1, [5, 6, 7], SamplingParams(), StoppingParams(max_tokens=4, ignore_eos=True))
    b = Sequence(2, [8] * 9, SamplingParams(), StoppingParams(max_tokens=6, ignore_eos=True))
    engine.add(a)
    engine.step()
    step = engine.last_step
    assert (step.is_prefill, step.batch_size, step.num_tokens, step.joined_running_batch) == (
        True, 1, 3, False)
    assert 0 < step.forward_seconds < step.total_seconds and step.tokproc_seconds > 0
    engine.add(b)
    engine.step()                       # b joins the running batch
    step = engine.last_step
    assert (step.is_prefill, step.batch_size, step.num_tokens, step.joined_running_batch) == (
        True, 1, 9, True)
    engine.step()
    assert (engine.last_step.is_prefill, engine.last_step.batch_size) == (False, 2)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (2, 0)
    assert stats.batch_tokens == (3 + 2) + (9 + 2)
    assert stats.batch_max_remaining_tokens == 6 - 2
    # The KV cache holds the tokens computed so far: a's 4 in 1 block, b's 10 in 3.
    assert stats.kv_blocks_used == 1 + 3 and stats.kv_blocks_total == 64
    engine.abort(1, "cancelled")
    engine.step()                       # only the abort's output and b's decode
    assert engine.stats().num_running == 1
    while engine.has_work():
        engine.step()
    assert engine.stats().kv_blocks_used == 0
    engine.step()                       # nothing ran the model
    assert engine.last_step is None
