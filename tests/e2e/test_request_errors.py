"""Requests the server must refuse and how it reports them (issue 10): a missing text_input,
parameter rows per prompt, refusals counted as the tokenizer's failures, unknown parameters.
Over gRPC (tritonclient streaming, stream true and false) and HTTP generate / generate_stream."""
from __future__ import annotations

import json
import queue
import re
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import deltas_once_equal, http_post, settled_metrics
from textgen_backend.serving import contract
from textgen_client import TextgenClient, TextgenError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"
PROMPTS = ["The quick brown fox", "Paris is the capital", "Hello world"]
_WIRE = {s.name: s.wire_dtype for s in contract.ENSEMBLE_INPUTS + contract.TOKENIZER_INPUTS}
MISSING_TEXT_INPUT = r"text_input is required|missing required input\(s\) \['text_input'\]"
ROWS_DISAGREE = "input 'text_input' batch size does not match other inputs for 'ensemble'"


def tensors(**arrays) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        array = np.asarray(array)
        infer_input = grpcclient.InferInput(name, list(array.shape), _WIRE[name])
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def prompts(*texts: str) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=np.object_)


def grpc_stream(server, inputs, **kwargs):
    """(responses, error text or None) of one request on a tritonclient stream; kwargs go to
    async_stream_infer (parameters=, priority=, ...)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("ensemble", inputs, enable_empty_final_response=True, **kwargs)
        results = []
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                return results, str(error)
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()
        client.close()


def http_error(server, payload: dict, stream: bool = False) -> str:
    status, bodies = http_post(server, payload, stream)
    assert status == 400 and len(bodies) == 1, (status, bodies)
    return bodies[0]["error"]


def last_per_row(values_by_row: list[tuple[int, int]]) -> dict[int, int]:
    last = {}
    for row, value in values_by_row:
        last[row] = value
    return last


# --- (3) a request without text_input --------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_grpc_request_without_text_input_gets_an_error_naming_it(tiny_server, stream):
    # Only generation parameters (the tokenizer step gets no input at all), then with one of
    # the tokenizer's own inputs (it runs and sees no text_input).
    for extra in ({}, {"apply_chat_template": np.array([[False]])}):
        inputs = tensors(max_tokens=np.array([[3]], np.int32), stream=np.array([[stream]]),
                         **extra)
        responses, error = grpc_stream(tiny_server, inputs)
        assert error is not None and re.search(MISSING_TEXT_INPUT, error), (extra, error)
        assert responses == []


def test_http_request_without_text_input_gets_an_error_naming_it(tiny_server):
    assert re.search(MISSING_TEXT_INPUT, http_error(tiny_server, {"max_tokens": 3}))
    assert re.search(MISSING_TEXT_INPUT, http_error(
        tiny_server, {"max_tokens": 3, "stream": True, "apply_chat_template": False},
        stream=True))


def test_tokenize_api_without_text_input_names_it(tiny_server, client_for):
    client = client_for(tiny_server)
    with pytest.raises(Exception, match="text_input is required"):
        client._client.infer("tokenizer", tensors(return_tokens=np.array([[True]])))


# --- (4) one row per prompt for every parameter ----------------------------------------------

def test_every_parameter_has_one_row_per_prompt_over_grpc_and_http(tiny_server, client_for):
    max_tokens, seeds = [2, 5, 3], [11, 22, 33]
    inputs = tensors(text_input=prompts(*PROMPTS),
                     max_tokens=np.array([[n] for n in max_tokens], np.int32),
                     temperature=np.full((3, 1), 1.0, np.float32),
                     seed=np.array([[s] for s in seeds], np.uint64))
    chunks = list(client_for(tiny_server).stream_inputs(inputs))
    assert last_per_row([(c.batch_index, c.num_output_tokens) for c in chunks]) == {
        0: 2, 1: 5, 2: 3}
    assert last_per_row([(c.batch_index, c.seed_used) for c in chunks]) == {0: 11, 1: 22, 2: 33}

    status, events = http_post(tiny_server, {"text_input": PROMPTS, "max_tokens": max_tokens,
                                             "temperature": [1.0] * 3, "seed": seeds},
                               stream=True)
    assert status == 200
    assert last_per_row([(e["batch_index"], e["num_output_tokens"]) for e in events]) == {
        0: 2, 1: 5, 2: 3}
    assert last_per_row([(e["batch_index"], e["seed_used"]) for e in events]) == {
        0: 11, 1: 22, 2: 33}


def test_a_parameter_with_one_row_for_several_prompts_is_refused(tiny_server, client_for):
    inputs = tensors(text_input=prompts(*PROMPTS), max_tokens=np.array([[4]], np.int32))
    with pytest.raises(TextgenError, match=re.escape(ROWS_DISAGREE)):
        list(client_for(tiny_server).stream_inputs(inputs))
    for max_tokens in ([4], 4):
        assert ROWS_DISAGREE in http_error(
            tiny_server, {"text_input": PROMPTS, "max_tokens": max_tokens}, stream=True)
    # ...which is what the reference says clients must send.
    for page in ("docs/request-reference.md", "README.md"):
        text = " ".join((ROOT / page).read_text().split())
        assert "applies to all prompts" not in text, page
    reference = " ".join((ROOT / "docs/request-reference.md").read_text().split())
    assert "every parameter sent needs one row per prompt" in reference


# --- (5) a refused request is a failure of the model that refused it -------------------------

def test_refused_requests_count_as_tokenizer_failures_and_spare_the_others(
        tiny_server, tiny_reference):
    expected_ids = tiny_reference.greedy(tiny_reference.encode(PROMPT), 6)

    def accepted():
        client = TextgenClient(tiny_server.grpc_url)
        try:
            return client.generate(PROMPT, max_tokens=6).output_ids
        finally:
            client.close()

    def refused_empty():
        client = TextgenClient(tiny_server.grpc_url)
        try:
            client.generate("", max_tokens=6)
        except TextgenError as exc:
            return str(exc)
        finally:
            client.close()

    def refused_invalid_utf8_tokenize():
        client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
        try:
            client.infer("tokenizer", tensors(text_input=np.array([[b"\xff\xfe bad"]],
                                                                  dtype=np.object_)))
        except Exception as exc:
            return str(exc)
        finally:
            client.close()

    def refused_unknown_parameter():
        return http_error(tiny_server, {"text_input": PROMPT, "max_token": 6})

    before = settled_metrics(tiny_server)
    jobs = [accepted, refused_empty, accepted, refused_unknown_parameter, accepted,
            refused_invalid_utf8_tokenize, accepted, refused_empty, accepted, accepted]
    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = list(pool.map(lambda job: job(), jobs))
    errors = [o for job, o in zip(jobs, outcomes) if job is not accepted]
    assert [o for job, o in zip(jobs, outcomes) if job is accepted] == [expected_ids] * 6
    assert "text_input row 0 is empty" in errors[0] and "text_input row 0 is empty" in errors[3]
    assert "unknown parameter 'max_token'" in errors[1]
    assert "text_input row 0 is not valid UTF-8" in errors[2]

    expected = {
        'nv_inference_request_failure{model="tokenizer",reason="BACKEND",version="1"}': 4,
        'nv_inference_request_failure{model="tokenizer",reason="OTHER",version="1"}': 0,
        'nv_inference_request_success{model="tokenizer",version="1"}': 6,
        'nv_inference_request_success{model="ensemble",version="1"}': 6,
        'nv_inference_request_success{model="generator",version="1"}': 6,
        "tgi_tokenize_request_count": 6,
    }
    assert deltas_once_equal(tiny_server, before, expected) == expected


# --- (7) unknown parameters -------------------------------------------------------------------

def test_unknown_parameters_are_refused_naming_them(tiny_server):
    error = http_error(tiny_server, {"text_input": PROMPT, "max_token": 5})
    assert "unknown parameter 'max_token' (did you mean 'max_tokens'?)" in error
    error = http_error(tiny_server, {"text_input": PROMPT, "lora_rank": 8,
                                     "stream": True}, stream=True)
    assert "unknown parameter 'lora_rank'" in error
    # generate's "parameters" object: keys that name an input are inputs, others parameters.
    error = http_error(tiny_server, {"text_input": PROMPT, "parameters": {"temprature": 0.5}})
    assert "unknown parameter 'temprature' (did you mean 'temperature'?)" in error
    for stream in (False, True):
        inputs = tensors(text_input=prompts(PROMPT), max_tokens=np.array([[3]], np.int32),
                         stream=np.array([[stream]]))
        responses, error = grpc_stream(tiny_server, inputs,
                                       parameters={"max_token": 5, "lora_rank": 8})
        assert error is not None and responses == []
        assert "unknown parameters 'lora_rank', 'max_token' (did you mean 'max_tokens'?)" in error


def test_readme_curl_request_id_and_reserved_parameters_still_work(tiny_server, tiny_reference):
    readme = (ROOT / "README.md").read_text()
    payload = json.loads(re.search(
        r"curl -s localhost:8000/v2/models/ensemble/generate -d '(\{.*?\})'", readme).group(1))
    status, [body] = http_post(tiny_server, payload)
    expected = tiny_reference.greedy(tiny_reference.encode(payload["text_input"]),
                                     payload["max_tokens"])
    assert status == 200 and body["output_ids"] == expected

    status, [body] = http_post(tiny_server, {"id": "req-7", "text_input": PROMPT,
                                             "parameters": {"max_tokens": 3}})
    assert status == 200 and body["num_output_tokens"] == 3 and body["id"] == "req-7"
    # Triton consumes its reserved parameters (priority, timeout, the request id) over gRPC.
    inputs = tensors(text_input=prompts(PROMPT), max_tokens=np.array([[3]], np.int32))
    responses, error = grpc_stream(tiny_server, inputs, request_id="r1", priority=1,
                                   timeout=60_000_000)
    assert error is None
    assert [r.as_numpy("num_output_tokens").item() for r in responses
            if r.as_numpy("num_output_tokens") is not None] == [3]
