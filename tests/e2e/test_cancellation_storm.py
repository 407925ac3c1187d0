"""Cancellations under overload: streams cancelled by their clients while twice as many clients
as --max-concurrent-requests keep the server full (and keep getting refused). Every
cancellation must reach the generator: counted as cancelled, never as a success."""
from __future__ import annotations

import random
import threading
import time

import pytest

from conftest import _serve, settled_metrics
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e
MAX_TOKENS = 400
SUCCESS = 'tgi_request_success{kind="stream",stop_reason="length"}'
CANCELLED = 'tgi_request_failure{err="cancelled"}'


@pytest.fixture(scope="module")
def full_server(tiny_model_dir, tmp_path_factory):
    yield from _serve(tmp_path_factory, "cancel-storm", model_id=str(tiny_model_dir),
                      max_input_tokens=100, max_total_tokens=512, max_concurrent_requests=12)


def _client_loop(url: str, seed: int, until: float, tally: dict, lock: threading.Lock) -> None:
    rnd = random.Random(seed)
    while time.monotonic() < until:
        cancel_after = rnd.randint(1, 6) if rnd.random() < 0.4 else None
        client = TextgenClient(url)
        outcome = "refused"
        try:
            chunks = client.stream("The quick brown fox", max_tokens=MAX_TOKENS, ignore_eos=True)
            for received, chunk in enumerate(chunks, 1):
                if chunk.finish_reason:
                    outcome = "finished"
                    break
                if received == cancel_after:
                    chunks.close()  # stop_stream(cancel_requests=True)
                    outcome = "cancelled"
                    break
        except Exception:  # over --max-concurrent-requests: refused, as intended
            pass
        finally:
            client.close()
        with lock:
            tally[outcome] += 1


def test_every_cancellation_under_overload_reaches_the_generator(full_server):
    before = settled_metrics(full_server)
    tally = {"refused": 0, "finished": 0, "cancelled": 0}
    lock = threading.Lock()
    until = time.monotonic() + 15
    workers = [threading.Thread(target=_client_loop,
                                args=(full_server.grpc_url, seed, until, tally, lock))
               for seed in range(24)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = settled_metrics(full_server)
    assert tally["cancelled"] >= 5 and tally["refused"] > 0, tally
    assert after.get(CANCELLED, 0) - before.get(CANCELLED, 0) == tally["cancelled"], tally
    assert after[SUCCESS] - before.get(SUCCESS, 0) == tally["finished"], tally
    assert after["textgen_kv_cache_blocks_used"] == 0
    assert after["tgi_batch_current_size"] == 0
    # Still serving.
    client = TextgenClient(full_server.grpc_url)
    assert client.generate("Hello", max_tokens=3).num_output_tokens == 3
    client.close()


def test_a_cancelled_stream_is_relayed_to_the_generator_once(full_server):
    """The responses already on their way when a client cancels each reach the detokenizer;
    relaying every one of them again (a blocking call to the generator) made the detokenizer lag
    under load until cancellations arrived after generation had ended."""
    generator_requests = 'nv_inference_request_success{model="generator",version="1"}'
    before = settled_metrics(full_server)
    client = TextgenClient(full_server.grpc_url)
    chunks = client.stream("The quick brown fox", max_tokens=MAX_TOKENS, ignore_eos=True)
    for _ in range(3):
        next(chunks)
    chunks.close()
    client.close()
    deadline = time.monotonic() + 10
    while settled_metrics(full_server).get(CANCELLED, 0) == before.get(CANCELLED, 0):
        assert time.monotonic() < deadline, "the cancellation never reached the generator"
        time.sleep(0.05)
    time.sleep(1)  # responses still queued for the detokenizer arrive and are answered
    after = settled_metrics(full_server)
    # One request that generated, one that relayed its cancellation.
    assert after[generator_requests] - before[generator_requests] == 2
