"""The tgi_* / textgen_* metrics on Triton's metrics endpoint, after known traffic: exact
counter values and histogram counts (deltas over the session's servers)."""
from __future__ import annotations

import json

import pytest

from conftest import deltas_once_equal, settled_metrics
from textgen_client import TextgenError

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"


def test_known_traffic_gives_exact_counters_and_histogram_counts(tiny_server, tiny_reference,
                                                                  client_for):
    client = client_for(tiny_server)
    before = settled_metrics(tiny_server)
    n_prompt = len(tiny_reference.encode(PROMPT))
    batch_prompts = [PROMPT, "Paris"]
    n_batch = [len(tiny_reference.encode(p)) for p in batch_prompts]

    for _ in range(2):
        assert client.generate(PROMPT, max_tokens=5).finish_reason == "length"
    assert sum(len(c.output_ids) for c in client.stream(PROMPT, max_tokens=4)) == 4
    assert [r.num_output_tokens for r in client.generate_batch(batch_prompts, max_tokens=3)] == [
        3, 3]
    with pytest.raises(TextgenError, match="max_tokens must be >= 1"):
        client.generate(PROMPT, max_tokens=-5)

    engine_expected = {
        'tgi_batch_inference_count{method="prefill"}': 4,
        'tgi_batch_inference_success{method="prefill"}': 4,
        'tgi_batch_inference_count{method="next_token"}': 2 * 4 + 3 + 2,
        'tgi_batch_inference_batch_size_count{method="prefill"}': 4,
        'tgi_batch_inference_batch_size_sum{method="prefill"}': 1 + 1 + 1 + 2,
        'tgi_batch_inference_batch_size_sum{method="next_token"}': 2 * 4 + 3 + 2 * 2,
        'tgi_batch_inference_duration_count{makeup="single_only",method="next_token"}': 13,
        'tgi_batch_inference_forward_duration_count{makeup="single_only",method="prefill"}': 4,
        "tgi_batch_next_tokens_count": 4,
        "tgi_batch_next_tokens_sum": 3 * n_prompt + sum(n_batch),
        "tgi_batch_concatenation_count": 0,
    }
    assert deltas_once_equal(tiny_server, before, engine_expected) == engine_expected

    generated = 2 * 5 + 4 + 2 * 3
    expected = {
        'tgi_request_count{kind="single"}': 3,
        'tgi_request_count{kind="stream"}': 1,
        'tgi_request_count{kind="batch"}': 1,
        "tgi_request_input_count": 6,
        'tgi_request_success{kind="single",stop_reason="length"}': 2,
        'tgi_request_success{kind="stream",stop_reason="length"}': 1,
        'tgi_request_success{kind="batch",stop_reason="length"}': 2,
        'tgi_request_failure{err="validation"}': 1,
        "tgi_request_raw_input_length_count": 6,
        "tgi_request_input_length_count": 5,
        "tgi_request_input_length_sum": 3 * n_prompt + sum(n_batch),
        "tgi_request_max_new_tokens_sum": 5 + 5 + 4 + 3 + 3,
        "tgi_request_validation_duration_count": 4,   # per request
        "tgi_request_generated_tokens_count": 5,
        "tgi_request_generated_tokens_sum": generated,
        'tgi_request_generated_tokens_bucket{le="4"}': 3,
        'tgi_request_generated_tokens_bucket{le="8"}': 5,
        "tgi_request_total_tokens_sum": 3 * n_prompt + sum(n_batch) + generated,
        "tgi_request_duration_count": 5,
        "tgi_request_queue_duration_count": 5,
        "tgi_request_inference_duration_count": 5,
        "tgi_request_mean_time_per_token_duration_count": 5,
        "textgen_time_to_first_token_seconds_count": 5,
        "textgen_inter_token_latency_seconds_count": 5,
        "tgi_tokenize_request_count": 5,
        "tgi_tokenize_request_input_count": 6,
        "tgi_tokenize_request_tokens_sum": 4 * n_prompt + sum(n_batch),
        "tgi_tokenize_request_duration_count": 5,
        "tgi_prompt_load_failure": 0,
    }
    assert deltas_once_equal(tiny_server, before, expected) == expected

    after = settled_metrics(tiny_server)
    for gauge in ("tgi_batch_current_size", "tgi_queue_size", "textgen_num_requests_running",
                  "textgen_kv_cache_blocks_used", "tgi_batch_input_tokens"):
        assert after[gauge] == 0, gauge
    assert after["textgen_kv_cache_blocks_total"] == 4 * 256 // 16
    # Every engine step is a success or a failure, and every request a success or a failure.
    steps = [k for k in after if k.startswith("tgi_batch_inference_count")]
    assert sum(after[k] for k in steps) == sum(
        v for k, v in after.items() if k.startswith(("tgi_batch_inference_success",
                                                      "tgi_batch_inference_failure")))
    for name in ("tgi_queue_jump", "tgi_prompt_load_duration_count"):
        assert after[name] == 0   # never updated / no soft prompt loaded on this server


def test_eos_and_a_cancelled_stream(demo_server, client_for):
    # On the demo model, which ends its answers with EOS; tritonserver 2.51 then waits its full
    # exit timeout for the cancelled ensemble request, which the demo server's tests pay anyway.
    client = client_for(demo_server)
    before = settled_metrics(demo_server)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.generate(json.dumps(question), apply_chat_template=True, max_tokens=20)
    assert answer.finish_reason == "eos_token"
    chunks = client.stream("Write a very long story about a dragon.", max_tokens=300,
                           ignore_eos=True)
    for _ in range(2):           # the client leaves after two responses
        next(chunks)
    chunks.close()
    expected = {
        'tgi_request_count{kind="single"}': 1,
        'tgi_request_count{kind="stream"}': 1,
        'tgi_request_success{kind="single",stop_reason="eos_token"}': 1,
        'tgi_request_success{kind="stream",stop_reason="length"}': 0,
        'tgi_request_failure{err="cancelled"}': 1,
        "tgi_request_generated_tokens_count": 1,
        "tgi_request_generated_tokens_sum": len(answer.output_ids),
        "tgi_request_max_new_tokens_sum": 20 + 300,
        "textgen_time_to_first_token_seconds_count": 1,
    }
    assert deltas_once_equal(demo_server, before, expected) == expected
