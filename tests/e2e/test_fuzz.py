"""A storm of random valid and malformed requests, interleaved and concurrent, through the real
server: every malformed one gets an error naming the problem, every valid one the output it
gets alone, the server stays up and no KV block stays held."""
from __future__ import annotations

import concurrent.futures as futures
import random
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import metric
from textgen_client import TextgenClient, TextgenError
from textgen_client.client import build_inputs

pytestmark = pytest.mark.e2e

REQUESTS = 520
PROMPTS = ["The quick brown fox", "Hello world: 12345", "Café, naïve 😀 日本語", "Paris"]
VALID = [
    dict(max_tokens=6),
    dict(max_tokens=9, stop_words=["e", "o"]),
    dict(max_tokens=5, exclude_input_in_output=False),
    dict(max_tokens=7, temperature=0.9, top_k=20, top_p=0.9, seed=5),
    dict(max_tokens=6, repetition_penalty=1.3, presence_penalty=0.5, min_tokens=2),
    dict(max_tokens=4, return_log_probs=True, top_n_tokens=2),
    dict(sampling_parameters={"max_tokens": 6, "min_p": 0.1, "seed": 9}),
    dict(max_tokens=5, bad_words=["the"], truncate_input_tokens=3),
]


def raw(name, array, datatype):
    item = grpcclient.InferInput(name, list(array.shape), datatype)
    item.set_data_from_numpy(array)
    return item


def text(value=b"The quick brown fox", rows=1):
    return raw("text_input", np.array([[value]] * rows, dtype=object), "BYTES")


def malformed(rng: random.Random):
    """(inputs, the words the error must contain) for a random kind of bad request."""
    prompt = [rng.choice(PROMPTS)]
    bad_float = rng.choice([-0.5, -3.0])
    cases = [
        (dict(max_tokens=rng.randint(-50, 0)), ["max_tokens must be >= 1"]),
        (dict(top_p=rng.choice([0.0, 1.5, 7.0])), ["top_p must be in (0, 1]"]),
        (dict(temperature=bad_float), ["temperature must be >= 0"]),
        (dict(typical_p=rng.choice([0.0, 2.0])), ["typical_p must be in (0, 1]"]),
        (dict(min_p=1.5), ["min_p must be in [0, 1]"]),
        (dict(repetition_penalty=0.0), ["repetition_penalty must be > 0"]),
        (dict(frequency_penalty=3.0), ["frequency_penalty must be in [-2, 2]"]),
        (dict(top_n_tokens=9), ["top_n_tokens", "max_top_n_tokens=5"]),
        (dict(best_of=5, temperature=1.0), ["best_of", "max_best_of=2"]),
        (dict(stop_words=["a", "b", "c", "d", "e"]), ["max_stop_sequences is 4"]),
        (dict(stop_words=["x" * 300]), ["stop sequence has 300 characters"]),
        (dict(sampling_parameters={"max_tokens": 3, "beams": 2}), ["unknown keys ['beams']"]),
        (dict(sampling_parameters="{oops"), ["sampling_parameters is not valid JSON"]),
        (dict(max_tokens=3, min_tokens=9), ["min_tokens must be in [0, max_tokens=3]"]),
        (dict(length_penalty_decay_factor=2.0), ["length_penalty_start_index and"]),
        (dict(time_limit_ms=0), ["time_limit_ms must be >= 1"]),
        (dict(max_tokens=255), ["exceeds max_total_tokens 256"]),
    ]
    kind = rng.randrange(len(cases) + 6)
    if kind < len(cases):
        params, words = cases[kind]
        return build_inputs(prompt, **params), words
    kind -= len(cases)
    if kind == 0:    # wrong dtype
        return [text(), raw("max_tokens", np.array([[4.0]], np.float32), "FP32")], ["max_tokens"]
    if kind == 1:    # wrong shape
        return [text(), raw("max_tokens", np.array([[4, 5]], np.int32), "INT32")], ["max_tokens"]
    if kind == 2:    # batch sizes that disagree (Triton itself refuses these)
        return [text(rows=2), raw("max_tokens", np.array([[4]] * 3, np.int32), "INT32")], [
            "batch size does not match"]
    if kind == 3:
        return [text(b"")], ["text_input row 0 is empty"]
    if kind == 4:
        return [text(b"\xff\xfe broken")], ["not valid UTF-8"]
    return [text(b"fox " * 400)], ["max_input_tokens is 200"]


def run(server, inputs):
    client = TextgenClient(server.grpc_url)
    try:
        results = {}
        for chunk in client.stream_inputs(inputs):
            results.setdefault(chunk.batch_index, []).extend(chunk.output_ids)
        return "ok", [results[k] for k in sorted(results)]
    except TextgenError as exc:
        return "error", str(exc)
    finally:
        client.close()


def test_fuzz_storm(tiny_server):
    rng = random.Random(20261122)
    valid_cases = [(p, params) for p in PROMPTS for params in VALID]
    solo = {i: run(tiny_server, build_inputs([p], **params))
            for i, (p, params) in enumerate(valid_cases)}
    bad = {i: v for i, v in solo.items() if v[0] != "ok"}
    assert not bad, bad
    jobs = []
    for _ in range(REQUESTS):
        if rng.random() < 0.4:
            index = rng.randrange(len(valid_cases))
            prompt, params = valid_cases[index]
            jobs.append(("valid", index, build_inputs([prompt], **params)))
        else:
            inputs, words = malformed(rng)
            jobs.append(("malformed", words, inputs))
    with futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(lambda job: run(tiny_server, job[2]), jobs))
    failures = []
    for (kind, expected, _), (outcome, value) in zip(jobs, outcomes):
        if kind == "valid" and (outcome, value) != solo[expected]:
            failures.append(("valid request changed", solo[expected], value))
        if kind == "malformed" and (outcome != "error" or not all(w in value for w in expected)):
            failures.append(("malformed request not named", expected, value))
    assert not failures, failures[:5]
    assert sum(kind == "malformed" for kind, _, _ in jobs) >= 250
    assert tiny_server.is_alive()
    deadline = time.monotonic() + 10
    while metric(tiny_server, "textgen_kv_cache_blocks_used") != 0:
        assert time.monotonic() < deadline, "KV blocks still held after the storm"
        time.sleep(0.1)
    assert metric(tiny_server, "tgi_batch_current_size") == 0
