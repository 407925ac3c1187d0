"""The engine serves a batch that mixes the base model and LoRA adapters of different ranks and
targets: each row equals PEFT's greedy answer for its adapter alone (float32, CPU)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lora_adapters import ATTENTION, MLP, PeftReference, save_fused_lora, save_random_lora
from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_kernels.lora import TILE_MIN_TOKENS, compile_token_counts, lora_shrink_splits
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


def _serve(engine, seqs):
    outputs = _run(engine, seqs)
    return [outputs[s.seq_id] for s in seqs]


def _greedy_seqs(refs, tokens=10):
    return [Sequence(i, PROMPTS[i % len(PROMPTS)], SamplingParams(),
                     StoppingParams(max_tokens=tokens, ignore_eos=True), adapter=ref)
            for i, ref in enumerate(refs)]


@pytest.mark.parametrize("method, options", [("gptq", {"desc_act": True}), ("awq", {})])
def test_adapters_on_a_quantized_base_equal_peft_on_its_dequantized_weights(setup, tmp_path,
                                                                            method, options):
    from quant_checkpoints import write_quantized

    model_dir, adapters, _ = setup
    quant_dir, ref_dir = write_quantized(model_dir, tmp_path, method=method, **options)
    config = EngineConfig(model_id=str(quant_dir), max_lora_rank=16)
    engine = Engine(config, quant_dir)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(quant_dir))
    names = [None, "attn-r4", "all-r16-rslora"]
    refs = [catalog.resolve(str(adapters[n]), "local", "") if n else None for n in names]
    reference = PeftReference(ref_dir)
    expected = [reference.greedy(adapters[n] if n else None, PROMPTS[i], 10)
                for i, n in enumerate(names)]
    assert _serve(engine, _greedy_seqs(refs)) == expected


def test_an_adapter_trained_on_fused_projections_maps_onto_ours(setup, tmp_path):
    model_dir, _, reference = setup
    shared, fused = save_fused_lora(model_dir, tmp_path, 8, seed=9)
    config = EngineConfig(model_id=str(model_dir), max_lora_rank=8)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    engine = Engine(config, model_dir)
    got = _serve(engine, _greedy_seqs([catalog.resolve(str(fused), "local", "")] * 2))
    assert got == [reference.greedy(shared, PROMPTS[i], 10) for i in range(2)]
    assert got[0] != reference.greedy(None, PROMPTS[0], 10)


def test_pickled_adapters_only_under_load_format_pt(setup, tmp_path):
    from safetensors.torch import load_file

    from textgen_backend.adapters.peft_format import AdapterError

    model_dir, adapters, reference = setup
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(adapters["mlp-r8"] / "adapter_model.safetensors"),
               pickled / "adapter_model.bin")
    (pickled / "adapter_config.json").write_text(
        (adapters["mlp-r8"] / "adapter_config.json").read_text())
    refused = AdapterCatalog(EngineConfig(model_id=str(model_dir)), ModelConfig.from_dir(model_dir))
    with pytest.raises(AdapterError, match="--load-format pt"):
        refused.resolve(str(pickled), "local", "")
    config = EngineConfig(model_id=str(model_dir), max_lora_rank=16, load_format="pt")
    ref = AdapterCatalog(config, ModelConfig.from_dir(model_dir)).resolve(str(pickled), "local", "")
    got = _serve(Engine(config, model_dir), _greedy_seqs([ref]))
    assert got == [reference.greedy(adapters["mlp-r8"], PROMPTS[0], 10)]


def test_hub_adapters_resolve_offline_from_the_hub_cache(setup, tmp_path):
    import shutil

    from textgen_backend.adapters.peft_format import AdapterError

    model_dir, adapters, _ = setup
    repo = tmp_path / "hub" / "models--someone--attn-lora"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(adapters["attn-r4"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    config = EngineConfig(model_id=str(model_dir), huggingface_hub_cache=str(tmp_path / "hub"))
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    ref = catalog.resolve("someone/attn-lora", "hub", "")
    assert Path(ref.directories[0]) == snapshot.resolve() or Path(ref.directories[0]) == snapshot
    with pytest.raises(AdapterError, match="never downloaded"):
        catalog.resolve("someone/elsewhere", "hub", "")


def test_compiling_the_kernels_runs_each_projection_shape_at_each_variant_count(setup):
    """What the engine runs at start on the GPU so that the first adapter request compiles
    nothing (tests/gpu/test_no_compile_while_serving.py checks that there): every projection
    shape, every token count of compile_token_counts, rows of no adapter, slots untouched."""
    model_dir, _, _ = setup
    config = EngineConfig(model_id=str(model_dir), max_active_adapters=2, max_lora_rank=16,
                          adapter_source="local")
    slots = Engine(config, model_dir).runner.adapter_slots
    calls = []
    for projection in slots.projections.values():
        def shrink(x, a_slots, slot_of_token, shrink=projection.ops.lora_shrink,
                   p=projection):
            calls.append((x.shape[0], p.in_features, p.out_features, p.shard_starts,
                          set(slot_of_token.tolist())))
            return shrink(x, a_slots, slot_of_token)
        projection.ops = dataclasses.replace(projection.ops, lora_shrink=shrink)
    before = {key: (p.a_slots.clone(), p.b_slots.clone())
              for key, p in slots.projections.items()}
    slots.compile_kernels(300)
    shapes = {(p.in_features, p.out_features, p.shard_starts)
              for p in slots.projections.values()}
    assert len(shapes) >= 3  # qkv, o / down, gate_up on the tiny model
    counts = compile_token_counts(300, sorted({(p.in_features, p.a_slots.shape[1])
                                               for p in slots.projections.values()}))
    assert TILE_MIN_TOKENS in counts and 1 in counts
    assert sorted({(c[0], *c[1:4]) for c in calls}) == sorted(
        (count, *shape) for count in counts for shape in shapes)
    assert all(c[4] == {-1} for c in calls)
    for key, p in slots.projections.items():
        for now, then in zip((p.a_slots, p.b_slots), before[key]):  # uninitialized: NaNs
            assert torch.equal(now.view(torch.uint8), then.view(torch.uint8))


def test_the_compile_counts_reach_every_variant_any_token_count_reaches():
    """A variant, by Triton's rule (integer arguments specialized on == 1, divisibility by 16):
    the path (per token or tiles), and the classes of the K splits, of h's row stride
    (count x rank) and, on the tiles, of the count; for Llama-3-8B's projections at
    --max-lora-rank 16 and 64 (qkv's capacity is 3 x the rank, gate_up's 2 x) and odd ranks,
    and for steps past the prefill budget (decode rows beside a full chunk)."""
    def kind(n):
        return "one" if n == 1 else "16" if n % 16 == 0 else "other"

    def variant(count, k, rank):
        tiles = count >= TILE_MIN_TOKENS
        return (tiles, kind(lora_shrink_splits(count, k, rank)),
                kind(count) if tiles else None, kind(count * rank))
    shapes = [(4096, 48), (4096, 16), (4096, 32), (14336, 16), (4096, 192), (4096, 64),
              (4096, 128), (14336, 64), (4096, 3), (4096, 12)]
    for max_tokens in (300, 1000, 8192 + 512):
        counts = compile_token_counts(max_tokens, shapes)
        assert counts[0] == 1 and counts[-1] <= max_tokens
        for k, rank in shapes:
            assert ({variant(c, k, rank) for c in counts}
                    == {variant(c, k, rank) for c in range(1, max_tokens + 1)}), (k, rank)


def test_an_adapter_retrained_in_place_is_served_anew(setup, tmp_path):
    """The same directory with new weights is a new adapter: not the slot loaded before, and
    not the prefix cache's KV of the old weights (the prompt spans full blocks)."""
    import os
    import shutil

    model_dir, _, reference = setup
    first = save_random_lora(model_dir, tmp_path / "first", 8, ATTENTION, seed=5)
    second = save_random_lora(model_dir, tmp_path / "second", 8, ATTENTION, seed=6)
    served = tmp_path / "served"
    shutil.copytree(first, served)
    config = EngineConfig(model_id=str(model_dir), max_active_adapters=4, max_lora_rank=16,
                          adapter_source="local")
    engine = Engine(config, model_dir)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    prompt = list(range(3, 43))
    outputs = []
    for seq_id, trained in enumerate((first, second)):
        if seq_id:
            shutil.rmtree(served)
            shutil.copytree(trained, served)
            later = os.stat(first).st_mtime + 10  # whatever the file system's mtime grain
            for path in [served, *served.iterdir()]:
                os.utime(path, (later, later))
        seq = Sequence(seq_id, prompt, SamplingParams(),
                       StoppingParams(max_tokens=8, ignore_eos=True),
                       adapter=catalog.resolve(str(served), "local", ""))
        outputs.append(_run(engine, [seq])[seq_id])
    expected = [reference.greedy(first, prompt, 8), reference.greedy(second, prompt, 8)]
    assert expected[0] != expected[1]
    assert outputs == expected


def test_a_base_only_server_refuses_every_adapter(setup):
    from textgen_backend.adapters.peft_format import AdapterError

    model_dir, adapters, _ = setup
    config = EngineConfig(model_id=str(model_dir), max_lora_rank=0)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    with pytest.raises(AdapterError, match=r"'attn': this server serves the base model only "
                                           r"\(--max-lora-rank 0\)"):
        catalog.resolve("attn", "local", "")
    assert catalog.resolve("", "local", "") is None


def test_the_batch_keeps_stepping_while_an_adapter_loads(setup):
    """The load runs on a worker thread: held there, the running sequence still gains a token
    every step while the adapter's prompt waits; released, that prompt is served as PEFT's."""
    import threading

    model_dir, adapters, reference = setup
    config = EngineConfig(model_id=str(model_dir), max_active_adapters=2, max_lora_rank=16,
                          adapter_source="local")
    engine = Engine(config, model_dir)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    release, load = threading.Event(), engine.adapters._load
    engine.adapters._load = lambda ref: (release.wait(60), load(ref))[1]
    running = Sequence(0, PROMPTS[0], SamplingParams(),
                       StoppingParams(max_tokens=40, ignore_eos=True))
    waiting = Sequence(1, PROMPTS[1], SamplingParams(),
                       StoppingParams(max_tokens=8, ignore_eos=True),
                       adapter=catalog.resolve(str(adapters["attn-r4"]), "local", ""))
    engine.add(running)
    for _ in range(2):
        engine.step()
    engine.add(waiting)
    before = len(running.output_ids)
    for _ in range(12):
        engine.step()
    assert len(running.output_ids) >= before + 11 and not waiting.output_ids
    release.set()
    _run(engine, [])
    assert waiting.output_ids == reference.greedy(adapters["attn-r4"], PROMPTS[1], 8)
    assert running.output_ids == reference.greedy(None, PROMPTS[0], 40)


def test_a_linear_merge_of_overlapping_adapters_serves_the_merged_weights_once(setup,
                                                                               tmp_path):
    """LoRAX's linear merge of two adapters on the same projections, with different alphas:
    A = sum w_i A_i, B = sum w_i B_i, scaled like the first, written as a PEFT adapter for the
    reference; asked twice, the merge loads once."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir, _, reference = setup
    first = save_random_lora(model_dir, tmp_path / "first", 8, ATTENTION + MLP, seed=11,
                             alpha=16)
    second = save_random_lora(model_dir, tmp_path / "second", 8, ATTENTION + MLP, seed=12,
                              alpha=40)
    weights = (0.7, 0.5)
    a, b = (load_file(d / "adapter_model.safetensors") for d in (first, second))
    merged = tmp_path / "merged"
    shutil.copytree(first, merged)
    save_file({k: weights[0] * a[k] + weights[1] * b[k] for k in a},
              merged / "adapter_model.safetensors")
    config = EngineConfig(model_id=str(model_dir), max_active_adapters=4, max_lora_rank=16,
                          adapter_source="local")
    engine = Engine(config, model_dir)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    parameters = json.dumps({"adapter_ids": [str(first), str(second)], "weights": weights,
                             "merge_strategy": "linear"})
    seqs = [Sequence(i, PROMPTS[i], SamplingParams(),
                     StoppingParams(max_tokens=10, ignore_eos=True),
                     adapter=catalog.resolve("", "local", parameters)) for i in range(2)]
    outputs = _run(engine, seqs)
    assert [outputs[i] for i in range(2)] == [reference.greedy(merged, PROMPTS[i], 10)
                                               for i in range(2)]
    assert outputs[0] != reference.greedy(first, PROMPTS[0], 10)
    assert engine.adapters.counters.loads == 1
