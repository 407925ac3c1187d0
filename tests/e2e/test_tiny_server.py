"""A tiny random Llama served by a real tritonserver, checked token for token against
transformers (greedy, float32) over gRPC streaming and non-streaming and HTTP generate."""
from __future__ import annotations

import concurrent.futures as futures

import pytest

from conftest import http_generate, metric, settled_metrics
from textgen_client import TextgenError

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The quick brown fox",
    "Hello world: 12345",
    "Café, naïve, jalapeño! Emoji 😀 and 🚀; CJK 日本語",
    "Paris",
    "Streams of tokens become text, one delta at a time. The quick brown fox jumps over",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_grpc_greedy_parity_streaming_equals_non_streaming(tiny_server, tiny_reference,
                                                           client_for, prompt):
    client = client_for(tiny_server)
    prompt_ids = tiny_reference.encode(prompt)
    expected = tiny_reference.greedy(prompt_ids, 40)

    whole = client.generate(prompt, max_tokens=40)
    assert whole.output_ids == expected
    assert whole.finish_reason == "length"
    assert whole.num_input_tokens == len(prompt_ids) and whole.num_output_tokens == 40
    assert whole.text == tiny_reference.decode(expected)

    chunks = list(client.stream(prompt, max_tokens=40))
    assert len(chunks) > 1
    assert [t for c in chunks for t in c.output_ids] == expected
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 40


def test_http_generate_and_generate_stream(tiny_server, tiny_reference, client_for):
    prompt = PROMPTS[2]
    expected_ids = tiny_reference.greedy(tiny_reference.encode(prompt), 25)
    expected_text = client_for(tiny_server).generate(prompt, max_tokens=25).text
    assert expected_text == tiny_reference.decode(expected_ids)

    reply = http_generate(tiny_server, {"text_input": prompt, "max_tokens": 25})
    assert reply["text_output"] == expected_text
    assert reply["output_ids"] == expected_ids
    assert reply["finish_reason"] == "length" and reply["num_output_tokens"] == 25

    events = http_generate(tiny_server, {"text_input": prompt, "max_tokens": 25, "stream": True},
                           stream=True)
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == expected_text
    # The generate endpoint writes a one-element tensor as a bare value.
    as_list = [e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]]
               for e in events]
    assert [i for ids in as_list for i in ids] == expected_ids


def test_concurrent_requests_each_equal_their_single_result(tiny_server, tiny_reference,
                                                            client_for):
    cases = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 10 + 3 * i)
             for i in range(20)]
    expected = [tiny_reference.greedy(tiny_reference.encode(p), n) for p, n in cases]

    def run(case):
        prompt, n = case
        client = client_for(tiny_server)
        return [t for c in client.stream(prompt, max_tokens=n) for t in c.output_ids]

    with futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    assert results == expected


def test_batch_of_prompts_in_one_request(tiny_server, tiny_reference, client_for):
    prompts = PROMPTS[:3]
    for stream in (False, True):
        results = client_for(tiny_server).generate_batch(prompts, stream=stream, max_tokens=12)
        for prompt, result in zip(prompts, results):
            assert result.output_ids == tiny_reference.greedy(tiny_reference.encode(prompt), 12)
            assert result.finish_reason == "length"


def test_exclude_input_in_output_false_echoes_the_prompt(tiny_server, client_for):
    client = client_for(tiny_server)
    generated = client.generate(PROMPTS[0], max_tokens=8).text
    echoed = client.generate(PROMPTS[0], max_tokens=8, exclude_input_in_output=False).text
    assert echoed == PROMPTS[0] + generated
    streamed = "".join(c.text for c in client.stream(PROMPTS[0], max_tokens=8,
                                                     exclude_input_in_output=False))
    assert streamed == echoed


def test_sampling_with_seed_is_reproducible(tiny_server, client_for):
    client = client_for(tiny_server)
    params = dict(max_tokens=20, temperature=1.3, top_k=40, top_p=0.9)
    first = client.generate(PROMPTS[1], seed=7, **params).output_ids
    assert client.generate(PROMPTS[1], seed=7, **params).output_ids == first
    assert client.generate(PROMPTS[1], seed=8, **params).output_ids != first
    json_params = {"max_tokens": 20, "temperature": 1.3, "top_k": 40, "top_p": 0.9, "seed": 7}
    assert client.generate(PROMPTS[1], sampling_parameters=json_params).output_ids == first


BAD_REQUESTS = [
    (dict(max_tokens=-5), "max_tokens must be >= 1, got -5"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(top_k=-3), "top_k must be >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0, got 0.0"),
    (dict(frequency_penalty=2.5), "frequency_penalty must be in [-2, 2], got 2.5"),
    (dict(max_tokens=5, min_tokens=6), "min_tokens must be in [0, max_tokens=5], got 6"),
    (dict(max_tokens=255), "exceeds max_total_tokens 256"),
    (dict(stop_words=["a", "b", "c", "d", "e"]), "5 stop sequences given but max_stop_sequences is 4"),
    (dict(sampling_parameters={"max_tokens": 5, "beam_width": 2}),
     "sampling_parameters has unknown keys ['beam_width']"),
    (dict(sampling_parameters="{not json"), "sampling_parameters is not valid JSON"),
    (dict(max_tokens=5, sampling_parameters={"max_tokens": 5}),
     "max_tokens is given both as a tensor and in sampling_parameters"),
    (dict(apply_chat_template=True), "text_input must be a JSON list of messages"),
]


@pytest.mark.parametrize("params, message", BAD_REQUESTS)
def test_bad_request_gets_a_clear_error(tiny_server, client_for, params, message):
    with pytest.raises(TextgenError) as info:
        client_for(tiny_server).generate(PROMPTS[0], **params)
    assert message in str(info.value)


def test_prompt_too_long_and_empty_and_invalid_utf8(tiny_server, client_for, tiny_reference):
    client = client_for(tiny_server)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    n = len(tiny_reference.encode(long_prompt))
    with pytest.raises(TextgenError, match=f"input has {n} tokens but max_input_tokens is 200"):
        client.generate(long_prompt, max_tokens=1)
    with pytest.raises(TextgenError, match="text_input row 0 is empty"):
        client.generate("", max_tokens=1)
    import numpy as np
    import tritonclient.grpc as grpcclient
    raw = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    raw.set_data_from_numpy(np.array([[b"\xff\xfe bad"]], dtype=object))
    with pytest.raises(Exception, match="text_input row 0 is not valid UTF-8"):
        client._client.infer("tokenizer", [raw])


def test_server_stays_up_and_serves_others_during_bad_requests(tiny_server, tiny_reference,
                                                               client_for):
    expected = tiny_reference.greedy(tiny_reference.encode(PROMPTS[4]), 60)

    def bad(params):
        try:
            client_for(tiny_server).generate(PROMPTS[0], **params)
        except TextgenError as exc:
            return str(exc)
        return None

    with futures.ThreadPoolExecutor(8) as pool:
        good = pool.submit(lambda: client_for(tiny_server).generate(PROMPTS[4], max_tokens=60))
        errors = list(pool.map(bad, [p for p, _ in BAD_REQUESTS] * 2))
        assert good.result().output_ids == expected
    assert all(errors)
    assert tiny_server.is_alive()


def test_metrics_endpoint_answers(tiny_server, client_for):
    client_for(tiny_server).generate(PROMPTS[0], max_tokens=3)
    # settled: the gauges of the step that finished the request may land after its response
    metrics = settled_metrics(tiny_server)
    assert metrics['nv_inference_request_success{model="ensemble",version="1"}'] >= 1
    assert metrics["tgi_batch_current_size"] == 0
    assert metrics["textgen_kv_cache_blocks_used"] == 0


def test_preemption_under_a_small_kv_budget_gives_identical_results(small_kv_server,
                                                                    tiny_reference, client_for):
    cases = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 60) for i in range(16)]
    expected = [tiny_reference.greedy(tiny_reference.encode(p), n) for p, n in cases]

    def run(case):
        return client_for(small_kv_server).generate(case[0], max_tokens=case[1]).output_ids

    with futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    assert results == expected
    assert metric(small_kv_server, "textgen_preemptions_total") > 0
    assert metric(small_kv_server, "textgen_kv_cache_blocks_used") == 0


def test_overload_is_rejected_clearly(small_kv_server, client_for):
    def run(_):
        try:
            client_for(small_kv_server).generate(PROMPTS[0], max_tokens=120, ignore_eos=True)
            return None
        except TextgenError as exc:
            return str(exc)

    with futures.ThreadPoolExecutor(20) as pool:
        errors = [e for e in pool.map(run, range(20)) if e]
    assert errors, "20 concurrent requests over a limit of 16 must see overload errors"
    assert all("model is overloaded" in e and "max_concurrent_requests is 16" in e
               for e in errors)
