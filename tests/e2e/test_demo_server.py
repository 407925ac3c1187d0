"""The real demo model (SmolLM2-135M-Instruct, converted from GGUF) behind tritonserver."""
from __future__ import annotations

import json
import time

import pytest

from conftest import metric, scrape_metrics

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARIS_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


def chat_ids(reference, messages=QUESTION):
    return reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]


def test_chat_answers_paris(demo_server, client_for):
    client = client_for(demo_server)
    result = client.generate(json.dumps(QUESTION), apply_chat_template=True, max_tokens=30)
    assert result.text == "The capital of France is Paris."
    assert result.output_ids == PARIS_IDS
    assert result.finish_reason == "eos_token" and result.num_output_tokens == 8


def test_greedy_parity_with_transformers(demo_server, demo_reference, client_for):
    client = client_for(demo_server)
    for prompt in ["Once upon a time", "Hi 日本語 😀! Translate to English:",
                   "def fibonacci(n):"]:
        ids = demo_reference.encode(prompt)
        expected = demo_reference.greedy(ids, 30)
        chunks = list(client.stream(prompt, max_tokens=30))
        assert [t for c in chunks for t in c.output_ids] == expected, prompt
        streamed = "".join(c.text for c in chunks)
        assert streamed == client.generate(prompt, max_tokens=30).text
        assert streamed == demo_reference.decode(expected)


def test_stop_sequence_is_included_and_never_streamed_partially(demo_server, client_for):
    client = client_for(demo_server)
    chat = dict(apply_chat_template=True, max_tokens=30)
    result = client.generate(json.dumps(QUESTION), stop_words=["France"], **chat)
    assert result.text == "The capital of France" and result.finish_reason == "stop"
    assert result.output_ids == PARIS_IDS[:4]

    chunks = list(client.stream(json.dumps(QUESTION), stop_words=["Paris."], **chat))
    texts = [c.text for c in chunks]
    assert "".join(texts) == "The capital of France is Paris."
    assert chunks[-1].finish_reason == "stop"
    assert not any("Par" in t for t in texts[:-1]), texts  # held back until it matched
    # A partial match that fails is released: "is Lyon" starts matching at " is".
    lyon = client.generate(json.dumps(QUESTION), stop_words=["is Lyon"], **chat)
    assert lyon.text == "The capital of France is Paris." and lyon.finish_reason == "eos_token"


def test_min_tokens_suppresses_eos(demo_server, demo_reference, client_for):
    client = client_for(demo_server)
    result = client.generate(json.dumps(QUESTION), apply_chat_template=True, max_tokens=20,
                             min_tokens=12)
    expected = demo_reference.greedy(chat_ids(demo_reference), 20, min_new_tokens=12)
    assert result.output_ids == expected
    assert len(result.output_ids) >= 12 and result.output_ids[:7] == PARIS_IDS[:7]
    assert 2 not in result.output_ids[:11]


def test_cancelled_stream_stops_generation_and_frees_kv_blocks(demo_server, client_for):
    client = client_for(demo_server)
    stream = client.stream("Write a very long story about a dragon.", max_tokens=900,
                           ignore_eos=True)
    received = [next(stream) for _ in range(3)]
    assert all(c.finish_reason == "" for c in received)
    assert metric(demo_server, "textgen_kv_cache_blocks_used") > 0
    completed = scrape_metrics(demo_server)['nv_inference_count{model="ensemble",version="1"}']
    started = time.monotonic()
    stream.close()  # tritonclient stop_stream(cancel_requests=True)
    while metric(demo_server, "textgen_kv_cache_blocks_used") > 0:
        assert time.monotonic() - started < 5, "generation did not stop after cancellation"
        time.sleep(0.05)
    assert metric(demo_server, "tgi_batch_current_size") == 0
    # The ensemble request itself completes (else tritonserver counts it in flight forever).
    while scrape_metrics(demo_server)['nv_inference_count{model="ensemble",version="1"}'] == completed:
        assert time.monotonic() - started < 5, "the cancelled ensemble request never completed"
        time.sleep(0.05)
    # The server goes on serving.
    assert client_for(demo_server).generate("Once upon a time", max_tokens=3).num_output_tokens == 3
