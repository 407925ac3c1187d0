"""--num-shard 2 through the real server on the CPU (gloo, one worker process beside the engine):
every family token-exact to transformers with concurrent requests under preemption, streamed and
not, a batch of rows; LoRA adapters per row equal to PEFT; a worker killed mid-stream fails the
request with the cause and stops tritonserver (no hang)."""
from __future__ import annotations

import concurrent.futures as futures

import pytest

from conftest import (Reference, _serve, generate_rows, kill_mid_stream, metric,
                      processes_under)
from lora_adapters import ATTENTION, MLP, PeftReference, save_random_lora
from tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "Paris is the capital", "Hello world: 12345",
           "Streams of tokens become text", "Emoji 😀 and 🚀; CJK"]
# A KV cache of 160 tokens in blocks of 4: eight concurrent requests force preemption.
SMALL_KV = dict(max_input_tokens=60, max_total_tokens=100, max_batch_total_tokens=160,
                block_size=4, max_concurrent_requests=16)


def _shard_workers(server_pid: int) -> list[int]:
    return processes_under(server_pid, b"textgen_backend.parallel.worker")


@pytest.fixture(scope="module", params=[("llama", 2), ("mistral", 2), ("qwen2", 2),
                                        ("llama", 1)],
                ids=["llama", "mistral", "qwen2", "one-kv-head"])
def sharded(request, tmp_path_factory):
    family, kv_heads = request.param
    model_dir = build_tiny_model(tmp_path_factory.mktemp(f"tp-{family}"), family,
                                 num_kv_heads=kv_heads)
    for server in _serve(tmp_path_factory, f"tp-{family}-{kv_heads}", model_id=str(model_dir),
                         num_shard=2, **SMALL_KV):
        yield server, Reference(model_dir)


def test_sharded_server_is_token_exact_under_concurrency_and_preemption(sharded, client_for):
    server, reference = sharded
    assert len(_shard_workers(server.process.pid)) == 1
    cases = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 40) for i in range(8)]
    expected = [reference.greedy(reference.encode(p), n) for p, n in cases]

    def run(case, stream=False):
        return client_for(server).generate_batch([case[0]], stream=stream,
                                                 max_tokens=case[1])[0].output_ids

    with futures.ThreadPoolExecutor(len(cases)) as pool:
        assert list(pool.map(run, cases)) == expected
        assert list(pool.map(lambda case: run(case, stream=True), cases)) == expected
    assert metric(server, "textgen_preemptions_total") > 0
    rows = client_for(server).generate_batch(PROMPTS[:3], max_tokens=12)
    assert [r.output_ids for r in rows] == [reference.greedy(reference.encode(p), 12)
                                            for p in PROMPTS[:3]]
    assert metric(server, "textgen_kv_cache_blocks_used") == 0


def test_sharded_server_serves_adapters_per_row_as_peft(tiny_model_dir, tiny_reference,
                                                        tmp_path_factory, client_for):
    root = tmp_path_factory.mktemp("tp-adapters")
    save_random_lora(tiny_model_dir, root / "attn", 4, ATTENTION, seed=1)
    save_random_lora(tiny_model_dir, root / "all", 8, ATTENTION + MLP, seed=2)
    peft = PeftReference(tiny_model_dir)
    names = ["", "attn", "all", "attn"]
    for server in _serve(tmp_path_factory, "tp-adapters", model_id=str(tiny_model_dir),
                         num_shard=2, adapter_directory=str(root), adapter_source="local",
                         max_lora_rank=8, max_total_tokens=256):
        got = generate_rows(client_for(server), PROMPTS[:4], {"adapter_id": names},
                            max_tokens=12, ignore_eos=True)
    expected = [peft.greedy(root / name if name else None, tiny_reference.encode(prompt), 12)
                for name, prompt in zip(names, PROMPTS)]
    assert got == expected
    assert expected[1] != peft.greedy(None, tiny_reference.encode(PROMPTS[1]), 12)


def test_a_killed_worker_fails_the_stream_and_stops_the_server(tiny_model_dir,
                                                               tmp_path_factory):
    for server in _serve(tmp_path_factory, "tp-killed", model_id=str(tiny_model_dir),
                         num_shard=2, max_total_tokens=512):
        [worker] = _shard_workers(server.process.pid)
        kill_mid_stream(server, worker, "tensor-parallel worker 1 of 2 exited")
