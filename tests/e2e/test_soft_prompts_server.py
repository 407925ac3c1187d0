"""Soft prompts (TGIS prompt tuning, prefix_id) through the real server: a batch mixing none and
two prefixes equals the reference row by row, streaming equals non-streaming, bad prefix ids
are refused naming them while other requests are served, the load metrics count real loads, and
a cache of 0 MB reloads each switch."""
from __future__ import annotations

import concurrent.futures as futures

import pytest
import torch

from conftest import generate_rows, settled_metrics
from server import TritonServer
from soft_prompts import greedy_after_soft_prompt, prompt_embeddings, save_random_prompt_tuning
from textgen_backend.config import EngineConfig
from textgen_client import TextgenError

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Hello world: 12345", "Paris is the capital"]
TOKENS = 12


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-store")
    save_random_prompt_tuning(tiny_model_dir, root / "four", 4, seed=1)
    save_random_prompt_tuning(tiny_model_dir, root / "team" / "seven", 7, seed=2)
    save_random_prompt_tuning(tiny_model_dir, root / "long", 95, seed=3)
    (root / "wrong-shape").mkdir()
    torch.save(torch.randn(3, 65), root / "wrong-shape" / "decoder.pt")
    return root


def _serve(tmp_path_factory, name, model_dir, store, **config):
    return TritonServer(EngineConfig(dtype="float32", model_id=str(model_dir),
                                     prefix_store_path=str(store), max_input_tokens=100,
                                     max_total_tokens=200, **config),
                        tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module")
def prefix_server(tiny_model_dir, store, tmp_path_factory):
    server = _serve(tmp_path_factory, "prefix-server", tiny_model_dir, store)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(tiny_model_dir, tiny_reference, store):
    embeddings = {"": None, "four": prompt_embeddings(store / "four"),
                  "team/seven": prompt_embeddings(store / "team" / "seven")}

    def greedy(prefix_id, prompt, tokens=TOKENS):
        return greedy_after_soft_prompt(tiny_reference.model, embeddings[prefix_id],
                                        tiny_reference.encode(prompt), tokens)
    return greedy


def test_a_batch_mixing_prefixes_equals_the_reference_and_streams_the_same(
        prefix_server, client_for, expected, tiny_reference, store):
    client = client_for(prefix_server)
    names = ["", "four", "team/seven"]
    got = generate_rows(client, PROMPTS, {"prefix_id": names}, max_tokens=TOKENS,
                        ignore_eos=True)
    wanted = [expected(n, p) for n, p in zip(names, PROMPTS)]
    assert got == wanted
    assert wanted[1] != expected("", PROMPTS[1])   # the soft prompt changes the answer
    for name, prompt in zip(names, PROMPTS):
        streamed = [t for c in client.stream(prompt, max_tokens=TOKENS, prefix_id=name)
                    for t in c.output_ids]
        whole = client.generate(prompt, max_tokens=TOKENS,
                                sampling_parameters={"prefix_id": name})
        assert streamed == whole.output_ids == expected(name, prompt), name
        assert whole.num_input_tokens == len(tiny_reference.encode(prompt))  # real tokens only
    # prompt details: one per real token; the first is predicted after the soft prompt
    ids = tiny_reference.encode(PROMPTS[2])
    details = client.generate(PROMPTS[2], max_tokens=1, prefix_id="four",
                              decoder_input_details=True).input_token_details
    assert [d["id"] for d in details] == ids
    embeds = torch.cat([prompt_embeddings(store / "four"),
                        tiny_reference.model.get_input_embeddings()(torch.tensor(ids))])
    with torch.no_grad():
        logits = tiny_reference.model(inputs_embeds=embeds[None], use_cache=False).logits[0]
    log_probs = torch.log_softmax(logits[3:-1].float(), -1)   # positions P-1 .. end-2
    reference = log_probs.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
    assert [d["logprob"] for d in details] == pytest.approx(reference, abs=1e-4)


def test_bad_prefixes_are_refused_naming_them_and_loads_are_counted(
        prefix_server, client_for, expected):
    client = client_for(prefix_server)
    with futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: client_for(prefix_server).generate(
            PROMPTS[0], max_tokens=60, ignore_eos=True, prefix_id="four"))
        for prefix_id, words in [("../etc", "not a valid id"), ("missing", "not found"),
                                 ("wrong-shape", "expected [num_virtual_tokens, 64]"),
                                 ("long", "with the 95 virtual tokens of prefix_id 'long'")]:
            with pytest.raises(TextgenError) as error:
                client.generate(PROMPTS[2], max_tokens=4, prefix_id=prefix_id)
            assert repr(prefix_id) in str(error.value) and words in str(error.value), \
                str(error.value)
        assert in_flight.result().output_ids == expected("four", PROMPTS[0], 60)
    # every prefix used here was loaded once, whatever the number of requests
    metrics = settled_metrics(prefix_server)
    assert metrics["tgi_prompt_load_duration_count"] == 2
    assert metrics["tgi_prompt_load_failure"] == 0


def test_a_cache_of_zero_megabytes_reloads_each_switch(tiny_model_dir, store, tmp_path_factory,
                                                       expected):
    from textgen_client import TextgenClient

    server = _serve(tmp_path_factory, "prefix-no-cache", tiny_model_dir, store,
                    prompt_cache_size_mb=0)
    try:
        client = TextgenClient(server.grpc_url)
        for name in ["four", "team/seven", "four", "four", "team/seven"]:
            got = client.generate(PROMPTS[1], max_tokens=TOKENS, prefix_id=name)
            assert got.output_ids == expected(name, PROMPTS[1]), name
        client.close()
        # the newest prompt stays (its sequence needs it), so a repeat is a hit: 4 loads
        assert settled_metrics(server)["tgi_prompt_load_duration_count"] == 4
    finally:
        server.stop()
