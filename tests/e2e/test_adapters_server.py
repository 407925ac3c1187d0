"""LoRA adapters through the real server: batches and concurrent requests mixing the base model
and adapters of different ranks and targets equal PEFT's greedy answer per row, streaming equals
non-streaming, LoRAX merges equal their rule, bad adapters get errors naming them, and 5
adapters cycle through 2 slots with every answer right."""
from __future__ import annotations

import concurrent.futures as futures
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import generate_rows, scrape_metrics
from lora_adapters import ATTENTION, MLP, PeftReference, save_random_lora
from server import TritonServer
from textgen_backend.config import EngineConfig
from textgen_client import TextgenError
from tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Hello world: 12345", "Paris is the capital", "Café, naïve"]
TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_random_lora(tiny_model_dir, root / "attn-r4", 4, ATTENTION, seed=1)
    save_random_lora(tiny_model_dir, root / "mlp-r8", 8, MLP, seed=2)
    save_random_lora(tiny_model_dir, root / "all-r16", 16, ATTENTION + MLP, seed=3,
                     use_rslora=True, rank_pattern={"v_proj": 4})
    save_random_lora(tiny_model_dir, root / "attn-r8", 8, ATTENTION, seed=4)
    for i in range(5):
        save_random_lora(tiny_model_dir, root / f"small-{i}", 4, ["q_proj", "down_proj"],
                         seed=10 + i)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return PeftReference(tiny_model_dir)


def _serve(tmp_path_factory, name, model_dir, adapter_dir, **config):
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(model_dir),
                                       adapter_directory=str(adapter_dir), adapter_source="local",
                                       max_lora_rank=16, max_input_tokens=100,
                                       max_total_tokens=200, **config),
                          tmp_path_factory.mktemp(name))
    return server


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, adapters, tmp_path_factory):
    server = _serve(tmp_path_factory, "lora-server", tiny_model_dir, adapters,
                    max_active_adapters=4)
    yield server
    server.stop()


def _expected(reference, tiny_reference, adapters, name, prompt, tokens=TOKENS):
    return reference.greedy(adapters / name if name else None, tiny_reference.encode(prompt),
                            tokens)


def test_one_batch_mixing_the_base_model_and_three_adapters_equals_peft(
        lora_server, client_for, reference, tiny_reference, adapters):
    client = client_for(lora_server)
    names = ["", "attn-r4", "mlp-r8", "all-r16"]
    got = generate_rows(client, PROMPTS, {"adapter_id": names}, max_tokens=TOKENS,
                        ignore_eos=True)
    expected = [_expected(reference, tiny_reference, adapters, n, p, TOKENS) + []
                for n, p in zip(names, PROMPTS)]
    assert got == expected
    # every adapter changes its row's answer (else this test could not fail)
    for name, prompt, ids in zip(names[1:], PROMPTS[1:], expected[1:]):
        assert ids != _expected(reference, tiny_reference, adapters, "", prompt), name


def test_concurrent_requests_streaming_equals_non_streaming(
        lora_server, client_for, reference, tiny_reference, adapters):
    plan = [(n, p, s) for n in ["", "attn-r4", "mlp-r8", "all-r16"] for p in PROMPTS[:2]
            for s in (False, True)]

    def one(job):
        name, prompt, stream = job
        client = client_for(lora_server)
        if stream:
            return [t for c in client.stream(prompt, max_tokens=TOKENS, adapter_id=name)
                    for t in c.output_ids]
        return client.generate(prompt, max_tokens=TOKENS, adapter_id=name).output_ids

    with futures.ThreadPoolExecutor(len(plan)) as pool:
        got = list(pool.map(one, plan))
    for (name, prompt, _), ids in zip(plan, got):
        assert ids == _expected(reference, tiny_reference, adapters, name, prompt), name
    # vLLM's lora_name in sampling_parameters names the adapter too
    client = client_for(lora_server)
    by_lora_name = client.generate(PROMPTS[0], max_tokens=TOKENS,
                                   sampling_parameters={"lora_name": "mlp-r8"})
    assert by_lora_name.output_ids == _expected(reference, tiny_reference, adapters, "mlp-r8",
                                                PROMPTS[0])
    metrics = scrape_metrics(lora_server)
    assert metrics['textgen_adapter_requests_total{adapter="mlp-r8"}'] >= 5
    assert metrics['textgen_adapter_generated_tokens_total{adapter="mlp-r8"}'] >= 5 * TOKENS


def _linear_merge(adapters, names, weights, out_dir):
    """LoRAX's linear merge by its rule, as a PEFT directory: sum w_i A_i and sum w_i B_i over
    the adapters that have each tensor, scaled like the first adapter, targets united."""
    out_dir.mkdir()
    tensors = [load_file(adapters / n / "adapter_model.safetensors") for n in names]
    keys = {k for t in tensors for k in t}
    merged = {k: sum(w * t[k] for w, t in zip(weights, tensors) if k in t) for k in keys}
    save_file(merged, out_dir / "adapter_model.safetensors")
    configs = [json.loads((adapters / n / "adapter_config.json").read_text()) for n in names]
    targets = sorted({m for c in configs for m in c["target_modules"]})
    (out_dir / "adapter_config.json").write_text(json.dumps({**configs[0],
                                                             "target_modules": targets}))
    return out_dir


def test_linear_merge_equals_the_rule_applied_by_hand(
        lora_server, client_for, reference, tiny_reference, adapters, tmp_path):
    client = client_for(lora_server)
    merge = {"adapter_ids": ["attn-r8", "mlp-r8"], "weights": [0.7, 1.3],
             "merge_strategy": "linear"}
    got = client.generate(PROMPTS[1], max_tokens=TOKENS, adapter_parameters=json.dumps(merge))
    by_hand = _linear_merge(adapters, ["attn-r8", "mlp-r8"], [0.7, 1.3], tmp_path / "merged")
    expected = reference.greedy(by_hand, tiny_reference.encode(PROMPTS[1]), TOKENS)
    assert got.output_ids == expected
    assert expected != _expected(reference, tiny_reference, adapters, "attn-r8", PROMPTS[1])


def _bad_adapters(root, tiny_model_dir):
    """name -> (directory, the error's words)."""
    other_model = build_tiny_model(root / "other-model", "llama", hidden_size=32)
    save_random_lora(other_model, root / "other-base", 4, ATTENTION, seed=5)
    save_random_lora(tiny_model_dir, root / "rank-32", 32, ATTENTION, seed=6)
    dora = save_random_lora(tiny_model_dir, root / "dora", 4, ATTENTION, seed=7)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (root / "not-peft").mkdir()
    (root / "not-peft" / "weights.txt").write_text("nothing")
    base = save_random_lora(tiny_model_dir, root / "config-base", 4, ATTENTION, seed=8)
    for name, change in (("biases", {"bias": "lora_only"}),
                         ("saved-modules", {"modules_to_save": ["lm_head"]}),
                         ("lm-head", {"target_modules": ["q_proj", "lm_head"]}),
                         ("prompt-tuning", {"peft_type": "PROMPT_TUNING"})):
        shutil.copytree(base, root / name)
        config = json.loads((base / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
    return {"missing": "not found", "not-peft": "not a PEFT adapter directory",
            "dora": "DoRA", "rank-32": "rank 32", "other-base": "different base model",
            "biases": "trained biases", "saved-modules": "modules_to_save",
            "lm-head": "LoRA on 'lm_head'", "prompt-tuning": "peft_type 'PROMPT_TUNING'"}


def test_bad_adapters_get_errors_naming_them_while_others_are_served(
        lora_server, client_for, reference, tiny_reference, adapters, tiny_model_dir):
    expected_errors = _bad_adapters(adapters, tiny_model_dir)
    client = client_for(lora_server)
    with futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: client_for(lora_server).generate(
            PROMPTS[2], max_tokens=60, ignore_eos=True, adapter_id="all-r16"))
        for name, words in expected_errors.items():
            with pytest.raises(TextgenError) as error:
                client.generate(PROMPTS[0], max_tokens=4, adapter_id=name)
            assert name in str(error.value) and words in str(error.value), str(error.value)
        for source, words in [("s3", "not supported"), ("pbase", "not supported"),
                              ("ftp", "adapter_source must be")]:
            with pytest.raises(TextgenError, match=words):
                client.generate(PROMPTS[0], max_tokens=4, adapter_id="attn-r4",
                                adapter_source=source)
        with pytest.raises(TextgenError, match="not both"):
            client.generate(PROMPTS[0], max_tokens=4, adapter_id="attn-r4",
                            adapter_parameters=json.dumps({"adapter_ids": ["mlp-r8"]}))
        with pytest.raises(TextgenError, match="one rank"):
            client.generate(PROMPTS[0], max_tokens=4, adapter_parameters=json.dumps(
                {"adapter_ids": ["attn-r4", "mlp-r8"]}))
        assert in_flight.result().output_ids == _expected(reference, tiny_reference, adapters,
                                                          "all-r16", PROMPTS[2], 60)


def test_five_adapters_cycle_through_two_slots_beside_a_preloaded_one(
        tiny_model_dir, adapters, tmp_path_factory, reference, tiny_reference):
    """--adapter-id attn-r4 holds one of three slots for good; five more adapters cycle
    through the other two, attn-r4's requests among them."""
    server = _serve(tmp_path_factory, "lora-two-slots", tiny_model_dir, adapters,
                    max_active_adapters=3, adapter_cycle_time_s=0.2, adapter_id="attn-r4")
    try:
        plan = [(f"small-{i % 5}", PROMPTS[i % len(PROMPTS)]) for i in range(15)]
        plan += [("attn-r4", PROMPTS[i % len(PROMPTS)]) for i in range(3)]

        def one(job):
            from textgen_client import TextgenClient

            client = TextgenClient(server.grpc_url)
            try:
                return client.generate(job[1], max_tokens=40, ignore_eos=True,
                                       adapter_id=job[0]).output_ids
            finally:
                client.close()

        with futures.ThreadPoolExecutor(len(plan)) as pool:
            got = list(pool.map(one, plan))
        for (name, prompt), ids in zip(plan, got):
            assert ids == _expected(reference, tiny_reference, adapters, name, prompt, 40), name
        loads = scrape_metrics(server)["textgen_adapter_loads_total"]
        assert one(("attn-r4", PROMPTS[1])) == _expected(reference, tiny_reference, adapters,
                                                         "attn-r4", PROMPTS[1], 40)
        assert scrape_metrics(server)["textgen_adapter_loads_total"] == loads  # never left
        metrics = scrape_metrics(server)
        assert metrics["textgen_adapter_loads_total"] >= 5
        assert metrics["textgen_adapter_load_duration_seconds_count"] >= 5
        assert metrics["textgen_adapter_evictions_total"] >= 3
        assert metrics["textgen_adapters_active"] <= 3
    finally:
        server.stop()
