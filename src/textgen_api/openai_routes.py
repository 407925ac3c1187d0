"""OpenAI's API: `/v1/chat/completions` (messages through the model's chat template),
`/v1/completions`, `/v1/models`. `model` names the base model or, as in LoRAX, an adapter.
Errors: `{"error": {"message", "type", "param", "code"}}` with 400 / 401 / 429 / 503."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from textgen_api.config import ApiConfig
from textgen_api.ensemble import chunks, require, results, sse, started
from textgen_api.errors import ApiError
from textgen_client import GenerationResult

VALIDATION = 400
MAX_N = 128  # OpenAI's limit on n
_FINISH = {"length": "length", "eos_token": "stop", "stop": "stop"}
# vLLM's OpenAI server's extra sampling fields (genai-perf and benchmarks send ignore_eos)
_VLLM_EXTRAS = ("ignore_eos", "min_tokens", "top_k", "min_p", "repetition_penalty")
# fields that carry no generation parameter (accepted, unused)
_METADATA = {"model", "user", "metadata", "store", "stream", "stream_options", "n", "messages",
             "prompt"}


def _sampling(body: dict) -> dict:
    """The sampling fields every route shares -> ensemble inputs (OpenAI semantics: sampling at
    temperature 1 unless told otherwise, temperature 0 is greedy)."""
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    require(isinstance(temperature, (int, float)) and 0 <= temperature <= 2,
            "temperature must be in [0, 2]", "temperature", VALIDATION)
    params = {"temperature": float(temperature)}  # the ensemble samples unless it is 0
    top_p = body.get("top_p")
    require(top_p is None or (isinstance(top_p, (int, float)) and not isinstance(top_p, bool)),
            f"top_p must be a number, got {top_p!r}", "top_p", VALIDATION)
    if temperature > 0 and top_p is not None:
        params["top_p"] = float(top_p)
    for name in ("seed", "presence_penalty", "frequency_penalty") + _VLLM_EXTRAS:
        if body.get(name) is not None:
            params[name] = body[name]
    stop = body.get("stop")
    if stop:
        stop = [stop] if isinstance(stop, str) else stop
        require(isinstance(stop, list) and all(isinstance(s, str) for s in stop),
                "stop must be a string or a list of strings", "stop", VALIDATION)
        params["stop_words"] = stop
    return params


# the base model whatever it is called: huggingface_hub.InferenceClient sends "dummy" or "tgi"
# as `model` to a URL (TGI ignores the field)
_BASE_ALIASES = ("", "tgi", "dummy")


def _adapter(body: dict, config: ApiConfig) -> dict:
    model = body.get("model") or ""
    if model in _BASE_ALIASES or model == config.model_name:
        return {}
    return {"adapter_id": model}  # LoRAX: any other model names an adapter


def _int_field(body: dict, name: str, low: int, default: int | None = None,
               high: int | None = None) -> int | None:
    """body[name], an integer in [low, high], or default when absent (null)."""
    value = body.get(name)
    if value is None:
        return default
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high),
            f"{name} must be an integer >= {low}" + (f" and <= {high}" if high else "")
            + f", got {value!r}", name, VALIDATION)
    return value


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options") or {}
    require(isinstance(options, dict), "stream_options must be an object", "stream_options",
            VALIDATION)
    return bool(options.get("include_usage"))


def _refuse_unknown(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name not in known | _METADATA and value not in (None, False, [], {}):
            raise ApiError(VALIDATION, f"{name!r} is not supported", "invalid_request_error",
                           name)


def _response_format(body: dict) -> dict:
    fmt = body.get("response_format")
    require(fmt is None or isinstance(fmt, dict), "response_format must be an object",
            "response_format", VALIDATION)
    if not fmt or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"grammar": json.dumps({"type": "json", "value": {"type": "object"}})}
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        require(isinstance(schema, dict), "response_format.json_schema.schema is required",
                "response_format", VALIDATION)
        return {"grammar": json.dumps({"type": "json", "value": schema})}
    raise ApiError(VALIDATION, f"response_format type {fmt.get('type')!r} is not supported",
                   "invalid_request_error", "response_format")


def _chat_logprobs(details: list[dict]) -> dict:
    def entry(d):
        return {"token": d["text"], "logprob": d.get("logprob"),
                "bytes": list(d["text"].encode())}

    return {"content": [{**entry(d), "top_logprobs": [entry(t) for t in d.get("top_tokens", [])]}
                        for d in details]}


def _completion_logprobs(details: list[dict], offset: int) -> dict:
    offsets = []
    for d in details:
        offsets.append(offset)
        offset += len(d["text"])
    return {"tokens": [d["text"] for d in details],
            "token_logprobs": [d.get("logprob") for d in details],
            "top_logprobs": [{t["text"]: t["logprob"] for t in d.get("top_tokens", [])}
                             for d in details],
            "text_offset": offsets}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def router(config: ApiConfig) -> APIRouter:
    api = APIRouter(prefix="/v1")

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(VALIDATION, "the body is not JSON", "invalid_request_error") from None
        require(isinstance(body, dict), "the body must be a JSON object", "body", VALIDATION)
        return body

    @api.get("/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "textgen"}
            for name in (config.model_name, *config.adapters)]}

    @api.post("/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        _refuse_unknown(body, {"max_tokens", "max_completion_tokens", "temperature", "top_p",
                               "stop", "seed", "presence_penalty", "frequency_penalty",
                               "logprobs", "top_logprobs", "response_format", *_VLLM_EXTRAS})
        messages = body.get("messages")
        require(isinstance(messages, list) and messages, "messages must be a non-empty list",
                "messages", VALIDATION)
        rendered = []
        for message in messages:
            require(isinstance(message, dict) and isinstance(message.get("role"), str),
                    "each message needs a role", "messages", VALIDATION)
            content = message.get("content") or ""
            if isinstance(content, list):  # content parts: the text ones
                require(all(isinstance(p, dict) and isinstance(p.get("text", ""), str)
                            for p in content),
                        "each content part must be an object with a text", "messages",
                        VALIDATION)
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            require(isinstance(content, str), "a message's content must be a string or a list "
                    "of content parts", "messages", VALIDATION)
            rendered.append({"role": message["role"], "content": content})
        params = {**_sampling(body), **_adapter(body, config), **_response_format(body),
                  "apply_chat_template": True}
        max_tokens = (_int_field(body, "max_completion_tokens", 1)
                      or _int_field(body, "max_tokens", 1))
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        else:  # OpenAI's default: up to the context's end (the ensemble's own is 20)
            params["max_tokens_to_context"] = True
        top_logprobs = _int_field(body, "top_logprobs", 0)
        if body.get("logprobs"):
            params["return_log_probs"] = True
            params["top_n_tokens"] = top_logprobs or None
        n = _int_field(body, "n", 1, default=1, high=MAX_N)
        prompts = [json.dumps(rendered)] * n
        model = body.get("model") or config.model_name
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            usage = _include_usage(body)
            responses = await started(chunks(request.app.state.client, prompts, VALIDATION,
                                             stream=True, **params))
            return StreamingResponse(_chat_events(responses, len(prompts), ident, created,
                                                  model, usage, bool(body.get("logprobs"))),
                                     media_type="text/event-stream")
        found = await results(request.app.state.client, request, prompts, VALIDATION, **params)
        choices = []
        for row in range(n):
            result = found[(row, 0)]
            choices.append({"index": row,
                            "message": {"role": "assistant", "content": result.text},
                            "logprobs": (_chat_logprobs(result.token_details)
                                         if body.get("logprobs") else None),
                            "finish_reason": _FINISH.get(result.finish_reason, "length")})
        prompt_tokens = found[(0, 0)].num_input_tokens
        completion = sum(r.num_output_tokens for r in found.values())
        return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(prompt_tokens, completion)}

    async def _chat_events(responses, rows, ident, created, model, usage, logprobs):
        def event(choices, **extra):
            return sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": choices, **extra})

        for row in range(rows):
            yield event([{"index": row, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        prompt_tokens, completion = 0, {}
        try:
            async for chunk in responses:
                prompt_tokens = chunk.num_input_tokens
                completion[chunk.batch_index] = chunk.num_output_tokens
                if chunk.text or chunk.token_details:
                    yield event([{"index": chunk.batch_index, "delta": {"content": chunk.text},
                                  "logprobs": (_chat_logprobs(chunk.token_details)
                                               if logprobs else None),
                                  "finish_reason": None}])
                if chunk.finish_reason:
                    yield event([{"index": chunk.batch_index, "delta": {}, "logprobs": None,
                                  "finish_reason": _FINISH.get(chunk.finish_reason, "length")}])
        except ApiError as error:
            yield sse({"error": {"message": error.message, "type": error.kind,
                                 "param": error.param, "code": None}})
            return
        if usage:
            yield event([], usage=_usage(prompt_tokens, sum(completion.values())))
        yield sse("[DONE]")

    @api.post("/completions")
    async def completions(request: Request):
        body = await body_of(request)
        _refuse_unknown(body, {"max_tokens", "temperature", "top_p", "stop", "seed",
                               "presence_penalty", "frequency_penalty", "logprobs", "echo",
                               *_VLLM_EXTRAS})
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        require(isinstance(prompts, list) and prompts and all(isinstance(p, str)
                                                              for p in prompts),
                "prompt must be a string or a list of strings", "prompt", VALIDATION)
        params = {**_sampling(body), **_adapter(body, config),
                  "max_tokens": _int_field(body, "max_tokens", 1, default=16)}  # OpenAI's
        if body.get("echo"):
            params["exclude_input_in_output"] = False
        logprobs = _int_field(body, "logprobs", 0)
        if logprobs is not None:
            params["return_log_probs"] = True
            params["top_n_tokens"] = logprobs
        n = _int_field(body, "n", 1, default=1, high=MAX_N)
        model = body.get("model") or config.model_name
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            first = await started(chunks(request.app.state.client, [prompts[0]] * n,
                                         VALIDATION, stream=True, **params))
            usage = _include_usage(body)
            return StreamingResponse(_completion_events(request, first, prompts, n, params,
                                                        ident, created, model, usage,
                                                        logprobs is not None),
                                     media_type="text/event-stream")
        found = await asyncio.gather(*[
            results(request.app.state.client, request, [p] * n, VALIDATION, **params)
            for p in prompts])
        choices, prompt_tokens, completion = [], 0, 0
        for p, by_row in enumerate(found):
            prompt_tokens += by_row[(0, 0)].num_input_tokens
            for row in range(n):
                result: GenerationResult = by_row[(row, 0)]
                completion += result.num_output_tokens
                choices.append({"index": p * n + row, "text": result.text,
                                "logprobs": (_completion_logprobs(result.token_details, 0)
                                             if logprobs is not None else None),
                                "finish_reason": _FINISH.get(result.finish_reason, "length")})
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": _usage(prompt_tokens, completion)}

    async def _completion_events(request, first, prompts, n, params, ident, created, model,
                                 usage, logprobs):
        def event(choices, **extra):
            return sse({"id": ident, "object": "text_completion", "created": created,
                        "model": model, "choices": choices, **extra})

        prompt_tokens, completion = 0, 0
        try:
            for p, prompt in enumerate(prompts):  # one after another: indices stay in order
                responses = first if p == 0 else chunks(request.app.state.client, [prompt] * n,
                                                        VALIDATION, stream=True, **params)
                offsets, counted, prompt_tokens_of_prompt = [0] * n, {}, 0
                async for chunk in responses:
                    row = chunk.batch_index
                    counted[row] = chunk.num_output_tokens
                    prompt_tokens_of_prompt = chunk.num_input_tokens
                    yield event([{
                        "index": p * n + row, "text": chunk.text,
                        "logprobs": (_completion_logprobs(chunk.token_details, offsets[row])
                                     if logprobs else None),
                        "finish_reason": (_FINISH.get(chunk.finish_reason, "length")
                                          if chunk.finish_reason else None)}])
                    # the tokens' own texts, as the whole answer's offsets count them (a
                    # chunk's text can hold back a token's incomplete characters)
                    offsets[row] += sum(len(d["text"]) for d in chunk.token_details)
                prompt_tokens += prompt_tokens_of_prompt
                completion += sum(counted.values())
        except ApiError as error:
            yield sse({"error": {"message": error.message, "type": error.kind,
                                 "param": error.param, "code": None}})
            return
        if usage:
            yield event([], usage=_usage(prompt_tokens, completion))
        yield sse("[DONE]")

    return api
