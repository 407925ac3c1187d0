"""Faults inside engine steps, injected through TEXTGEN_FAULT_INJECTION (engine/faults.py) into a
real server: a step that raises fails exactly its requests with the cause and the server goes on;
out of memory, the step's newest sequences are recomputed and every request still gets the
output it gets alone; a lone sequence that does not fit fails with out-of-memory. KV blocks all
come back and tgi_batch_inference_failure counts each with its reason."""
from __future__ import annotations

import concurrent.futures as futures
import os
import time
import urllib.error
import urllib.request

import pytest

from conftest import settled_metrics
from server import FrontEnd, TritonServer
from textgen_backend.config import EngineConfig
from textgen_client import TextgenClient, TextgenError

pytestmark = pytest.mark.e2e
PROMPTS = ["The quick brown fox", "Paris is", "streams of tokens", "hello world",
           "one two three", "a red ball"]


def _server(tiny_model_dir, tmp_path_factory, faults: str, **config) -> TritonServer:
    previous = os.environ.get("TEXTGEN_FAULT_INJECTION")
    os.environ["TEXTGEN_FAULT_INJECTION"] = faults  # the engine process inherits it
    try:
        return TritonServer(EngineConfig(dtype="float32", model_id=str(tiny_model_dir),
                                         max_input_tokens=100, max_total_tokens=160, **config),
                            tmp_path_factory.mktemp("faults-server"))
    finally:
        if previous is None:
            del os.environ["TEXTGEN_FAULT_INJECTION"]
        else:
            os.environ["TEXTGEN_FAULT_INJECTION"] = previous


def _generate(server, prompt, tokens):
    client = TextgenClient(server.grpc_url)
    try:
        return client.generate(prompt, max_tokens=tokens, ignore_eos=True)
    except TextgenError as error:
        return error
    finally:
        client.close()


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(tiny_model_dir, tiny_reference,
                                                                 tmp_path_factory):
    server = _server(tiny_model_dir, tmp_path_factory, "raise@10")
    try:
        failed = _generate(server, PROMPTS[0], 30)  # steps 1-30: the 10th raises
        assert isinstance(failed, TextgenError)
        assert "generation failed: RuntimeError: injected fault at step 10" in str(failed)
        served = _generate(server, PROMPTS[1], 20)
        assert served.output_ids == tiny_reference.greedy(tiny_reference.encode(PROMPTS[1]), 20)
        metrics = settled_metrics(server)
        assert metrics['tgi_batch_inference_failure{method="next_token",reason="error"}'] == 1
        assert metrics["textgen_kv_cache_blocks_used"] == 0
    finally:
        server.stop()


def test_out_of_memory_recomputes_and_every_request_completes(tiny_model_dir, tiny_reference,
                                                              tmp_path_factory):
    # three OOMs in a row once six requests run: 6 -> 3 -> 2 -> 1 sequences per step
    server = _server(tiny_model_dir, tmp_path_factory, "oom@12,oom@13,oom@14")
    try:
        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: _generate(server, p, 30), PROMPTS))
        for prompt, result in zip(PROMPTS, results):
            assert not isinstance(result, Exception), result
            assert result.output_ids == tiny_reference.greedy(tiny_reference.encode(prompt), 30)
        metrics = settled_metrics(server)
        assert sum(v for k, v in metrics.items()
                   if k.startswith("tgi_batch_inference_failure") and 'reason="oom"' in k) == 3
        assert metrics["textgen_preemptions_total"] >= 3
        assert metrics["textgen_kv_cache_blocks_used"] == 0
    finally:
        server.stop()


def test_a_lone_sequence_out_of_memory_fails_with_the_cause(tiny_model_dir, tiny_reference,
                                                            tmp_path_factory):
    server = _server(tiny_model_dir, tmp_path_factory, "oom@3")
    try:
        failed = _generate(server, PROMPTS[2], 10)
        assert isinstance(failed, TextgenError)
        assert "out of memory for this sequence alone" in str(failed)
        served = _generate(server, PROMPTS[3], 10)
        assert served.output_ids == tiny_reference.greedy(tiny_reference.encode(PROMPTS[3]), 10)
        assert settled_metrics(server)["textgen_kv_cache_blocks_used"] == 0
    finally:
        server.stop()


def test_a_stuck_engine_is_stopped_and_its_requests_fail(tiny_model_dir, tmp_path_factory):
    # step 3 hangs for a minute; the server stays up to refuse (the default stops it:
    # tests/e2e/test_engine_process.py)
    server = _server(tiny_model_dir, tmp_path_factory, "sleep@3:60", engine_stall_timeout_s=2,
                     exit_on_engine_failure=False)
    try:
        started = time.monotonic()
        failed = _generate(server, PROMPTS[0], 20)
        assert isinstance(failed, TextgenError)
        assert "made no progress for 2s" in str(failed)
        assert time.monotonic() - started < 30
        refused = _generate(server, PROMPTS[1], 5)
        assert isinstance(refused, TextgenError) and "the engine is not running" in str(refused)
        front_end = FrontEnd(server)  # its /health is what a liveness probe asks
        try:
            with pytest.raises(urllib.error.HTTPError) as unhealthy:
                urllib.request.urlopen(f"{front_end.url}/health", timeout=30)
            assert unhealthy.value.code == 503
        finally:
            front_end.stop()
        assert server.is_alive()
        metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        assert 'tgi_request_failure{err="generate"' in metrics
    finally:
        server.stop()
