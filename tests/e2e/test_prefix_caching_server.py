"""Prefix caching through the real server: concurrent requests sharing prefixes of varied
lengths (partial blocks, whole repeats) on a KV budget small enough to evict cached blocks and
preempt running requests all equal transformers, the server ends holding no block, and the hit
counts after known traffic are exact."""
from __future__ import annotations

import concurrent.futures as futures
import random

import pytest

from conftest import settled_metrics
from server import TritonServer
from textgen_backend.config import EngineConfig
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e

SYSTEM = ("You are a helpful assistant. Answer briefly. The quick brown fox jumps over the lazy "
          "dog. Paris is the capital of France. ")
BLOCK = 4


@pytest.fixture(scope="module")
def cached_server(tiny_model_dir, tmp_path_factory):
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(tiny_model_dir),
                                       block_size=BLOCK, max_input_tokens=100,
                                       max_total_tokens=140, max_batch_total_tokens=400,
                                       max_concurrent_requests=64),
                          tmp_path_factory.mktemp("prefix-cache-server"))
    yield server
    server.stop()


def test_shared_prefixes_under_eviction_and_preemption_equal_transformers(
        cached_server, tiny_reference):
    rng = random.Random(0)
    words = "streams of tokens become text one delta at a time hello world".split()
    prompts = [SYSTEM[:rng.choice([20, 45, 70, len(SYSTEM)])] + " ".join(
        rng.choice(words) for _ in range(rng.randrange(1, 6))) for _ in range(24)]
    prompts += prompts[:8]   # whole repeats

    def one(prompt):
        client = TextgenClient(cached_server.grpc_url)
        try:
            return client.generate(prompt, max_tokens=30, ignore_eos=True)
        finally:
            client.close()

    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, prompts))
    for prompt, result in zip(prompts, results):
        assert result.output_ids == tiny_reference.greedy(tiny_reference.encode(prompt), 30)
    metrics = settled_metrics(cached_server)
    assert metrics["textgen_prefix_cache_hits_total"] > 0
    assert metrics["textgen_prefix_cache_evictions_total"] > 0
    assert metrics["textgen_preemptions_total"] > 0
    assert metrics["textgen_kv_cache_blocks_used"] == 0
    assert sum(r.num_cached_tokens for r in results) > 0


def test_a_repeated_prompt_reports_and_counts_its_hit(cached_server, tiny_reference):
    client = TextgenClient(cached_server.grpc_url)
    prompt = SYSTEM + "one more question"
    n = len(tiny_reference.encode(prompt))
    first = client.generate(prompt, max_tokens=3)   # computes it (what an earlier test left
    before = settled_metrics(cached_server)          # cached may cover part of it)
    again = client.generate(prompt, max_tokens=3)
    after = settled_metrics(cached_server)
    client.close()
    expected = (n - 1) // BLOCK * BLOCK               # the last token is always computed
    assert again.num_cached_tokens == expected and again.output_ids == first.output_ids
    assert after["textgen_prefix_cache_queries_total"] - before[
        "textgen_prefix_cache_queries_total"] == n
    assert after["textgen_prefix_cache_hits_total"] - before[
        "textgen_prefix_cache_hits_total"] == expected
    assert after["textgen_prefix_cache_blocks"] >= expected // BLOCK


def test_a_server_without_prefix_caching_computes_every_prompt(tiny_model_dir,
                                                               tmp_path_factory,
                                                               tiny_reference):
    """--no-prefix-caching: the same repeated prompts, the same answers, no hit, no cached
    block, nothing reported as cached."""
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(tiny_model_dir),
                                       block_size=BLOCK, max_input_tokens=100,
                                       max_total_tokens=140, prefix_caching=False),
                          tmp_path_factory.mktemp("no-prefix-cache-server"))
    try:
        client = TextgenClient(server.grpc_url)
        prompt = SYSTEM + "one more question"
        results = [client.generate(prompt, max_tokens=5) for _ in range(3)]
        client.close()
        expected = tiny_reference.greedy(tiny_reference.encode(prompt), 5)
        assert [r.output_ids for r in results] == [expected] * 3
        assert [r.num_cached_tokens for r in results] == [0] * 3
        metrics = settled_metrics(server)
        assert metrics["textgen_prefix_cache_hits_total"] == 0
        assert metrics["textgen_prefix_cache_blocks"] == 0
    finally:
        server.stop()
