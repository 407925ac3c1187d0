"""The REST front end (textgen_api) in front of a real tritonserver, called with the client
libraries people already use: `openai` (sync and async, streaming and not), TGI's
`text-generation` client, `lorax-client` and `huggingface_hub.InferenceClient`. Each answer equals
the ensemble's for the same greedy request; errors arrive as each client's own exceptions;
--api-key, CORS and the payload limit hold on every route; a client that goes away mid-stream
gets its request cancelled (the KV blocks come back)."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from conftest import metric, scrape_metrics
from server import FrontEnd

pytestmark = pytest.mark.e2e
MODEL = "tiny-test-model"
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def front(tiny_server):
    api = FrontEnd(tiny_server, "--model-name", MODEL)
    yield api
    api.stop()


def _post(url, payload, headers=None):
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_openai_chat_and_completions_equal_the_ensemble(front, tiny_server, client_for):
    import openai

    ensemble = client_for(tiny_server)
    expected_chat = ensemble.generate(json.dumps(MESSAGES), apply_chat_template=True,
                                      max_tokens=12, return_log_probs=True, top_n_tokens=2)
    expected = ensemble.generate(PROMPT, max_tokens=12)
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.content == expected_chat.text
    assert chat.choices[0].finish_reason == "length"
    assert [c.logprob for c in chat.choices[0].logprobs.content] == pytest.approx(
        [d["logprob"] for d in expected_chat.token_details], abs=1e-5)
    assert [[t.token for t in c.top_logprobs] for c in chat.choices[0].logprobs.content] == [
        [t["text"] for t in d["top_tokens"]] for d in expected_chat.token_details]
    assert chat.usage.completion_tokens == 12
    assert chat.usage.prompt_tokens == expected_chat.num_input_tokens
    pieces = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == \
        expected_chat.text
    assert pieces[-1].usage.completion_tokens == 12
    completion = client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT], max_tokens=12,
                                           temperature=0)
    assert [c.text for c in completion.choices] == [expected.text] * 2
    assert [c.index for c in completion.choices] == [0, 1]
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_openai_async_client_and_errors(front):
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{front.url}/v1", api_key="unused",
                                    max_retries=0)
        chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                    max_tokens=5, temperature=0)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                      max_tokens=5, temperature=0, stream=True)
        text = "".join([p.choices[0].delta.content or "" async for p in stream if p.choices])
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                 max_tokens=100000, temperature=0)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):  # before the stream
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 max_tokens=100000, temperature=0)
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                 logit_bias={"5": 1.0})
        await client.close()
        return chat.choices[0].message.content, text

    whole, streamed = asyncio.run(run())
    assert whole == streamed and whole


def test_tgi_and_lorax_clients_equal_the_ensemble(front, tiny_server, client_for):
    from huggingface_hub import InferenceClient
    from lorax import Client as LoraxClient
    from text_generation import Client as TgiClient
    from text_generation.errors import ValidationError

    expected = client_for(tiny_server).generate(PROMPT, max_tokens=10, return_log_probs=True,
                                                decoder_input_details=True)
    tgi = TgiClient(front.url)
    answer = tgi.generate(PROMPT, max_new_tokens=10, decoder_input_details=True)
    assert answer.generated_text == expected.text
    assert answer.details.generated_tokens == 10
    assert answer.details.finish_reason.value == "length"
    assert [t.id for t in answer.details.tokens] == expected.output_ids
    assert [t.logprob for t in answer.details.tokens] == pytest.approx(
        [d["logprob"] for d in expected.token_details], abs=1e-5)
    assert [t.id for t in answer.details.prefill] == [d["id"] for d in
                                                      expected.input_token_details]
    tokens = list(tgi.generate_stream(PROMPT, max_new_tokens=10))
    assert [r.token.id for r in tokens] == expected.output_ids
    assert tokens[-1].generated_text == expected.text
    best = tgi.generate(PROMPT, max_new_tokens=10, best_of=2, do_sample=True)
    assert len(best.details.best_of_sequences) == 1
    with pytest.raises(ValidationError):
        tgi.generate(PROMPT, max_new_tokens=100000)
    with pytest.raises(ValidationError):  # a 422 status, before any event
        list(tgi.generate_stream(PROMPT, max_new_tokens=100000))
    lorax = LoraxClient(front.url)
    answer = lorax.generate(PROMPT, max_new_tokens=10, details=True)
    assert answer.generated_text == expected.text
    assert answer.details.prompt_tokens == expected.num_input_tokens
    assert "".join(r.token.text for r in lorax.generate_stream(PROMPT, max_new_tokens=10)) \
        == expected.text
    hub = InferenceClient(front.url)
    assert hub.text_generation(PROMPT, max_new_tokens=10) == expected.text
    assert "".join(hub.text_generation(PROMPT, max_new_tokens=10, stream=True)) == expected.text
    chat = hub.chat_completion(MESSAGES, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == client_for(tiny_server).generate(
        json.dumps(MESSAGES), apply_chat_template=True, max_tokens=5).text
    details = hub.text_generation(PROMPT, max_new_tokens=10, details=True)
    assert [t.id for t in details.details.tokens] == expected.output_ids


def test_tokenize_info_health_and_unknown_parameters(front):
    status, _, body = _post(f"{front.url}/tokenize", {"inputs": PROMPT})
    assert status == 200 and [t["text"] for t in json.loads(body)]
    info = json.loads(urllib.request.urlopen(f"{front.url}/info").read())
    assert info["model_id"] == MODEL
    assert urllib.request.urlopen(f"{front.url}/health").status == 200
    status, _, body = _post(f"{front.url}/generate",
                            {"inputs": PROMPT, "parameters": {"frobnicate": 1}})
    assert status == 422 and "frobnicate" in json.loads(body)["error"]


def test_api_key_cors_and_payload_limit(tiny_server):
    api = FrontEnd(tiny_server, "--model-name", MODEL, "--api-key", "s3cret", "--cors-allow-origin",
                   "https://app.example", "--payload-limit", "2000")
    try:
        for path, payload in (("/generate", {"inputs": PROMPT}), ("/", {"inputs": PROMPT}),
                              ("/generate_stream", {"inputs": PROMPT}),
                              ("/v1/completions", {"prompt": PROMPT}),
                              ("/v1/chat/completions", {"messages": MESSAGES}),
                              ("/tokenize", {"inputs": PROMPT})):
            assert _post(api.url + path, payload)[0] == 401
            assert _post(api.url + path, payload, {"Authorization": "Bearer wrong"})[0] == 401
        for path in ("/info", "/health", "/v1/models"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(api.url + path)
            assert refused.value.code == 401
        key = {"Authorization": "Bearer s3cret"}
        status, headers, _ = _post(api.url + "/generate",
                                   {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
                                   {**key, "Origin": "https://app.example"})
        assert status == 200
        assert headers.get("access-control-allow-origin") == "https://app.example"
        preflight = urllib.request.Request(  # a browser's, without the key: answered by CORS
            api.url + "/generate", method="OPTIONS",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        with urllib.request.urlopen(preflight) as answer:
            assert answer.headers["access-control-allow-origin"] == "https://app.example"
        status, headers, _ = _post(api.url + "/generate",
                                   {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
                                   {**key, "Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in {h.lower() for h in headers}
        assert _post(api.url + "/generate", {"inputs": "x" * 3000}, key)[0] == 413
    finally:
        api.stop()


def _cancelled(server) -> float:
    return sum(value for name, value in scrape_metrics(server).items()
               if name.startswith("tgi_request_failure") and "cancelled" in name)


def test_a_client_that_leaves_mid_stream_frees_its_request(front, tiny_server):
    import http.client

    before = _cancelled(tiny_server)
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    connection.request("POST", "/generate_stream", json.dumps(
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 240, "ignore_eos_token": True}}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event
    connection.close()      # the client leaves
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _cancelled(tiny_server) == before:
        time.sleep(0.1)
    assert _cancelled(tiny_server) == before + 1  # cancelled, not generated to its end
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and metric(tiny_server, "textgen_kv_cache_blocks_used"):
        time.sleep(0.1)
    assert metric(tiny_server, "textgen_kv_cache_blocks_used") == 0


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(front):
    """OpenAI's default, not the ensemble's 20: the tiny server's context is 256 tokens."""
    status, _, body = _post(f"{front.url}/v1/chat/completions",
                            {"model": MODEL, "messages": MESSAGES, "temperature": 0,
                             "ignore_eos": True})
    usage = json.loads(body)["usage"]
    assert status == 200 and usage["prompt_tokens"] + usage["completion_tokens"] == 256


def test_streamed_completions_carry_logprobs_and_usage(front, tiny_server, client_for):
    import openai

    expected = client_for(tiny_server).generate(PROMPT, max_tokens=8, return_log_probs=True,
                                                top_n_tokens=2)
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                      logprobs=2).choices[0].logprobs
    assert whole.token_logprobs == pytest.approx(
        [d["logprob"] for d in expected.token_details], abs=1e-5)
    pieces = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                            temperature=0, logprobs=2, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = [c.choices[0].logprobs for c in pieces if c.choices]
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    assert [x for lp in streamed for x in lp.token_logprobs] == pytest.approx(
        whole.token_logprobs, abs=1e-5)
    assert [x for lp in streamed for x in lp.text_offset] == whole.text_offset
    assert [x for lp in streamed for x in lp.top_logprobs] == whole.top_logprobs
    assert (pieces[-1].usage.prompt_tokens, pieces[-1].usage.completion_tokens) == (
        expected.num_input_tokens, 8)


@pytest.mark.parametrize("path, payload, status, words", [
    ("/v1/chat/completions", {"messages": MESSAGES, "n": "2"}, 400, "n must be an integer"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2.5}, 400,
     "max_tokens must be an integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [5]}]}, 400,
     "content part"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": "yes"}, 400, "logprobs must be"),
    ("/v1/completions", {"prompt": PROMPT, "seed": 1.5}, 400, "seed must be an integer"),
    ("/v1/completions", {"prompt": PROMPT, "n": 1000}, 400, "n must be an integer >= 1 and"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [1]}, 400, "stop must be a string or a"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": "x"}, 400, "top_p must be a number"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": "json"}, 400,
     "response_format must be an object"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True, "stream_options": "x"},
     400, "stream_options must be an object"),
    ("/generate", {"inputs": PROMPT, "parameters": {"merged_adapters": 5}}, 422,
     "merged_adapters must be an object"),
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}}, 422,
     "max_new_tokens must be an integer"),
    ("/generate", {"inputs": PROMPT, "parameters": {"stop": "."}}, 422, "stop must be a list"),
    ("/generate", {"inputs": PROMPT, "parameters": {"top_k": 2.5}}, 422,
     "top_k must be an integer"),
    ("/v1/nothing", {}, 404, "Not Found"),
    ("/nothing", {}, 404, "Not Found"),
])
def test_malformed_requests_get_each_apis_error_shape(front, path, payload, status, words):
    got, _, body = _post(front.url + path, payload)
    error = json.loads(body)["error"]
    assert got == status
    assert words in (error["message"] if path.startswith("/v1") else error)


def test_a_front_end_whose_tritonserver_is_unreachable_answers_503():
    import openai
    from types import SimpleNamespace

    from server import free_port

    api = FrontEnd(SimpleNamespace(grpc_url=f"127.0.0.1:{free_port()}"), "--model-name", MODEL)
    try:
        for path, payload in (("/generate", {"inputs": PROMPT}),
                              ("/generate_stream", {"inputs": PROMPT}),
                              ("/tokenize", {"inputs": PROMPT}),
                              ("/v1/completions", {"prompt": PROMPT})):
            status, _, body = _post(api.url + path, payload)
            error = json.loads(body)["error"]
            assert status == 503, (path, body)
            assert "UNAVAILABLE" in (error["message"] if path.startswith("/v1") else error)
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert refused.value.status_code == 503
    finally:
        api.stop()
