"""The engine serves a batch that mixes the base model and LoRA adapters of different ranks and
targets: each row equals PEFT's greedy answer for its adapter alone (float32, CPU)."""
from __future__ import annotations

import pytest

from lora_adapters import ATTENTION, MLP, PeftReference, save_random_lora
from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

PROMPTS = [[0, 5, 9, 42, 7], [0, 100, 3], [0, 17, 18, 19, 20, 21, 22, 23], [0, 250]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters-engine")
    model_dir = build_tiny_model(root / "model", "llama")
    adapters = {
        "attn-r4": save_random_lora(model_dir, root / "attn-r4", 4, ATTENTION, seed=1),
        "mlp-r8": save_random_lora(model_dir, root / "mlp-r8", 8, MLP, seed=2),
        "all-r16-rslora": save_random_lora(model_dir, root / "all-r16", 16, ATTENTION + MLP,
                                           seed=3, use_rslora=True,
                                           rank_pattern={"v_proj": 4},
                                           alpha_pattern={"down_proj": 3.0}),
    }
    return model_dir, adapters, PeftReference(model_dir)


def _run(engine, seqs):
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
    return {s.seq_id: s.output_ids for s in seqs}


def test_mixed_batch_equals_peft_for_each_row(setup):
    model_dir, adapters, reference = setup
    config = EngineConfig(model_id=str(model_dir), max_active_adapters=4, max_lora_rank=16,
                          adapter_source="local")
    engine = Engine(config, model_dir)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    plan = [None, "attn-r4", "mlp-r8", "all-r16-rslora", "attn-r4", None, "all-r16-rslora",
            "mlp-r8"]
    seqs = []
    for i, name in enumerate(plan):
        ref = catalog.resolve(str(adapters[name]), "local", "") if name else None
        seqs.append(Sequence(i, PROMPTS[i % len(PROMPTS)], SamplingParams(),
                             StoppingParams(max_tokens=12, ignore_eos=True), adapter=ref))
    outputs = _run(engine, seqs)
    expected = {i: reference.greedy(adapters[name] if name else None, PROMPTS[i % len(PROMPTS)],
                                    12) for i, name in enumerate(plan)}
    assert outputs == expected
    # the adapters change the answers (else the test could not fail)
    assert expected[1] != reference.greedy(None, PROMPTS[1], 12)
    assert expected[3] != reference.greedy(None, PROMPTS[3], 12)
    assert engine.adapters.num_active == 3


def test_an_adapter_that_fails_to_load_fails_only_its_sequences(setup, tmp_path):
    import shutil

    model_dir, adapters, reference = setup
    config = EngineConfig(model_id=str(model_dir), max_active_adapters=2, max_lora_rank=16)
    engine = Engine(config, model_dir)
    broken_dir = shutil.copytree(adapters["attn-r4"], tmp_path / "broken")
    broken = AdapterCatalog(config, ModelConfig.from_dir(model_dir)).resolve(
        str(broken_dir), "local", "")
    (broken_dir / "adapter_model.safetensors").write_bytes(b"truncated")  # after the check
    seqs = [Sequence(0, PROMPTS[0], SamplingParams(), StoppingParams(max_tokens=6),
                     adapter=broken),
            Sequence(1, PROMPTS[1], SamplingParams(),
                     StoppingParams(max_tokens=6, ignore_eos=True))]
    for seq in seqs:
        engine.add(seq)
    errors = {}
    while engine.has_work():
        for out in engine.step():
            if out.error:
                errors[out.seq_id] = out.error
    assert list(errors) == [0] and "adapter" in errors[0] and "failed to load" in errors[0]
    assert seqs[1].output_ids == reference.greedy(None, PROMPTS[1], 6)
    assert engine.stats().adapter_load_failures == 1
