"""Chunked prefill through the real server: a prompt 5x the chunk size, sent while a stream is
generating, equals transformers, and the stream keeps getting tokens while it is prefilled."""
from __future__ import annotations

import threading
import time

import pytest

from server import TritonServer
from textgen_backend.config import EngineConfig
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e
CHUNK = 16


@pytest.fixture(scope="module")
def chunked_server(tiny_model_dir, tmp_path_factory):
    server = TritonServer(EngineConfig(dtype="float32", model_id=str(tiny_model_dir),
                                       max_batch_prefill_tokens=CHUNK, max_input_tokens=150,
                                       max_total_tokens=256),
                          tmp_path_factory.mktemp("chunked-server"))
    yield server
    server.stop()


def test_a_long_prompt_is_chunked_while_a_stream_runs(chunked_server, tiny_reference):
    long_prompt = ("The quick brown fox jumps over the lazy dog. " * 8)
    n = len(tiny_reference.encode(long_prompt))
    assert n >= 5 * CHUNK
    arrivals = []
    stream_client = TextgenClient(chunked_server.grpc_url)

    def stream():
        for chunk in stream_client.stream("Paris", max_tokens=200, ignore_eos=True):
            arrivals.append((time.monotonic(), chunk.output_ids))

    streaming = threading.Thread(target=stream)
    streaming.start()
    while not arrivals:
        time.sleep(0.01)
    client = TextgenClient(chunked_server.grpc_url)
    sent = time.monotonic()
    long = client.generate(long_prompt, max_tokens=10)
    answered = time.monotonic()
    streaming.join()
    assert long.output_ids == tiny_reference.greedy(tiny_reference.encode(long_prompt), 10)
    assert long.num_input_tokens == n
    # the stream got tokens while the long prompt was prefilled and answered
    assert sum(len(ids) for t, ids in arrivals if sent <= t <= answered) >= 5
    assert [t for _, ids in arrivals for t in ids] == tiny_reference.greedy(
        tiny_reference.encode("Paris"), 200)
    client.close()
    stream_client.close()
