"""Speculative decoding through the real server (--speculate): with n-gram and Medusa drafts
every output is token-exact to transformers -- rows of one batch request, concurrent requests
under preemption, streaming equal to non-streaming, stop sequences -- the server ends holding
no KV block, and on the demo model a copying prompt gets its drafts accepted (several tokens
per step). The engine-level tests (tests/unit/test_speculation.py) cover acceptance with an
oracle proposer, every sampling parameter and the distribution check."""
from __future__ import annotations

import concurrent.futures as futures
import random

import pytest

from conftest import generate_rows, settled_metrics
from medusa_heads import add_random_medusa
from server import TritonServer
from textgen_backend.config import EngineConfig
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e

WORDS = "the cat sat on the mat and the dog ran to the park with a red ball".split()


@pytest.fixture(scope="module")
def ngram_server(tiny_model_dir, tmp_path_factory):
    # 120 blocks of 4 tokens: 16 concurrent requests of up to ~110 tokens must preempt
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(tiny_model_dir),
                                       speculate=3, block_size=4, max_input_tokens=80,
                                       max_total_tokens=120, max_batch_total_tokens=480,
                                       max_concurrent_requests=32),
                          tmp_path_factory.mktemp("ngram-server"))
    yield server
    server.stop()


def _repetitive_prompts(count: int, seed: int) -> list[str]:
    """Prompts that repeat phrases, so that the n-gram proposer finds earlier occurrences."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 5)))
        prompts.append((phrase + " ") * rng.randrange(2, 5))
    return prompts


def test_concurrent_requests_under_preemption_equal_transformers(ngram_server, tiny_reference):
    prompts = _repetitive_prompts(16, seed=0)

    def one(prompt):
        client = TextgenClient(ngram_server.grpc_url)
        try:
            return client.generate(prompt, max_tokens=40, ignore_eos=True)
        finally:
            client.close()

    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, prompts))
    for prompt, result in zip(prompts, results):
        assert result.output_ids == tiny_reference.greedy(tiny_reference.encode(prompt), 40)
    metrics = settled_metrics(ngram_server)
    assert metrics['textgen_speculation_draft_tokens_total{method="ngram"}'] > 0
    assert metrics["textgen_preemptions_total"] > 0
    assert metrics["textgen_kv_cache_blocks_used"] == 0


def test_batch_rows_streaming_and_stop_sequences(ngram_server, tiny_reference, client_for):
    client = client_for(ngram_server)
    prompts = _repetitive_prompts(3, seed=1)
    rows = generate_rows(client, prompts, {}, max_tokens=25, ignore_eos=True)
    assert rows == [tiny_reference.greedy(tiny_reference.encode(p), 25) for p in prompts]
    whole = client.generate(prompts[0], max_tokens=30, ignore_eos=True)
    streamed = list(client.stream(prompts[0], max_tokens=30, ignore_eos=True))
    assert "".join(chunk.text for chunk in streamed) == whole.text
    assert [t for chunk in streamed for t in chunk.output_ids] == whole.output_ids
    stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 4]
    stopped = client.generate(prompts[0], max_tokens=30, ignore_eos=True, stop_words=[stop])
    assert stopped.finish_reason == "stop" and stopped.text.endswith(stop)
    assert whole.text.startswith(stopped.text)


def test_medusa_heads_keep_rows_exact(tiny_model_dir, tiny_reference, tmp_path_factory,
                                      client_for):
    medusa_dir = add_random_medusa(tiny_model_dir, tmp_path_factory.mktemp("medusa") / "model",
                                   num_heads=3)
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(medusa_dir), speculate=3,
                                       max_input_tokens=80, max_total_tokens=120),
                          tmp_path_factory.mktemp("medusa-server"))
    try:
        prompts = ["Paris is", "The quick brown fox", "streams of tokens"]
        rows = generate_rows(client_for(server), prompts, {}, max_tokens=20, ignore_eos=True)
        assert rows == [tiny_reference.greedy(tiny_reference.encode(p), 20) for p in prompts]
        metrics = settled_metrics(server)
        assert metrics['textgen_speculation_draft_tokens_total{method="medusa"}'] > 0
    finally:
        server.stop()


PASSAGE = ("The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a "
           "small lamp and a notebook in which he wrote down the color of the sea, the "
           "direction of the wind and the names of the ships that passed the rocks.")


def test_a_copying_prompt_gets_drafts_accepted(demo_model_dir, demo_reference,
                                               tmp_path_factory, client_for):
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(demo_model_dir),
                                       speculate=4, max_total_tokens=512),
                          tmp_path_factory.mktemp("demo-speculation-server"))
    try:
        prompt = (f"Copy the text exactly.\nText: {PASSAGE}\nCopy: "
                  f"{' '.join(PASSAGE.split()[:6])}")
        result = client_for(server).generate(prompt, max_tokens=40)
        assert result.output_ids == demo_reference.greedy(demo_reference.encode(prompt), 40)
        metrics = settled_metrics(server)
        accepted = metrics['textgen_speculation_accepted_tokens_total{method="ngram"}']
        verified = metrics['textgen_speculation_verify_rows_total{method="ngram"}']
        assert accepted / verified > 1.0  # tokens per step: 1 + accepted per verification
    finally:
        server.stop()
