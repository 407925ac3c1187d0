"""TGI's and LoRAX's REST API: `POST /` (what the `text-generation` client, `lorax-client` and
`huggingface_hub.InferenceClient.text_generation` post to), `/generate`, `/generate_stream`,
`/tokenize`, `/info`, `/health`. Errors: 422 validation, 429 overload, as TGI's
`{"error", "error_type"}`."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from textgen_api.config import ApiConfig
from textgen_api.ensemble import chunks, require, results, sse, started
from textgen_api.errors import ApiError, from_ensemble
from textgen_client import GenerationResult, TextgenError

VALIDATION = 422
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's
# TGI's GenerateParameters -> the ensemble's inputs (same meaning)
_SAME = {"temperature": "temperature", "top_k": "top_k",
         "top_p": "top_p", "typical_p": "typical_p", "repetition_penalty": "repetition_penalty",
         "frequency_penalty": "frequency_penalty", "seed": "seed", "watermark": "watermark",
         "decoder_input_details": "decoder_input_details", "top_n_tokens": "top_n_tokens",
         "truncate": "truncate_input_tokens", "adapter_id": "adapter_id",
         "adapter_source": "adapter_source", "min_new_tokens": "min_tokens"}
# parameters a client may send that change nothing here when left at these values
_IGNORED = {"api_token": None, "return_k_alternatives": None, "stream": None,
            "ignore_eos_token": False}
_FINISH = {"length": "length", "eos_token": "eos_token", "stop": "stop_sequence"}


def ensemble_params(parameters: dict, stream: bool) -> dict:
    """TGI/LoRAX `parameters` -> ensemble inputs; an unknown or unsupported one is an error
    naming it (clients send every field, most null: null means unset)."""
    params = {"max_tokens": DEFAULT_MAX_NEW_TOKENS}
    for name, value in parameters.items():
        if value is None or _IGNORED.get(name, ...) == value:
            continue
        if name in _SAME:
            params[_SAME[name]] = value
        elif name == "do_sample":  # the ensemble samples when a sampling parameter is given
            if value:
                params.setdefault("temperature", 1.0)
        elif name == "max_new_tokens":
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"max_new_tokens must be an integer >= 1, got {value!r}", name, VALIDATION)
            params["max_tokens"] = value
        elif name == "stop":
            require(isinstance(value, list) and all(isinstance(v, str) for v in value),
                    "stop must be a list of strings", "stop", VALIDATION)
            params["stop_words"] = value or None
        elif name == "return_full_text":
            params["exclude_input_in_output"] = not value
        elif name == "details":
            params["return_log_probs"] = bool(value)
        elif name == "best_of":
            params["best_of"] = value
            params["num_return_sequences"] = value  # the others are best_of_sequences
        elif name in ("grammar", "response_format"):
            params["grammar"] = json.dumps(value)
        elif name == "merged_adapters":
            require(isinstance(value, dict), "merged_adapters must be an object", name,
                    VALIDATION)
            params["adapter_parameters"] = json.dumps({
                "adapter_ids": value.get("ids", []), "weights": value.get("weights", []),
                **{k: v for k, v in value.items() if k not in ("ids", "weights")}})
        elif name == "ignore_eos_token":
            params["ignore_eos"] = bool(value)
        else:
            raise ApiError(VALIDATION, f"parameter {name!r} is not supported", "validation", name)
    if stream:
        params["return_log_probs"] = True  # each streamed token carries its logprob (TGI)
    return params


def _token(detail: dict) -> dict:
    return {"id": detail["id"], "text": detail["text"], "logprob": detail.get("logprob"),
            "special": bool(detail.get("special", False))}


def _top_tokens(details: list[dict]) -> list[list[dict]] | None:
    if not any("top_tokens" in d for d in details):
        return None
    return [[_token(t) for t in d.get("top_tokens", [])] for d in details]


def _details(result: GenerationResult, seeded: bool) -> dict:
    return {"finish_reason": _FINISH.get(result.finish_reason, "length"),
            "generated_tokens": result.num_output_tokens,
            "seed": result.seed_used if seeded else None,
            "prompt_tokens": result.num_input_tokens,  # LoRAX's (lorax-client requires it)
            "prefill": [{"id": d["id"], "text": d["text"], "logprob": d.get("logprob")}
                        for d in result.input_token_details],
            "tokens": [_token(d) for d in result.token_details],
            "top_tokens": _top_tokens(result.token_details)}


def router(config: ApiConfig) -> APIRouter:
    api = APIRouter()

    async def body(request: Request) -> tuple[str, dict, bool]:
        try:
            payload = await request.json()
        except ValueError:
            raise ApiError(VALIDATION, "the body is not JSON", "validation") from None
        require(isinstance(payload, dict) and isinstance(payload.get("inputs"), str),
                "`inputs` (a string) is required", "inputs", VALIDATION)
        parameters = payload.get("parameters") or {}
        require(isinstance(parameters, dict), "`parameters` must be an object", "parameters",
                VALIDATION)
        return payload["inputs"], parameters, bool(payload.get("stream", False))

    async def generate(request: Request, inputs: str, parameters: dict):
        params = ensemble_params(parameters, stream=False)
        found = await results(request.app.state.client, request, [inputs], VALIDATION, **params)
        best = found[(0, 0)]
        seeded = bool(parameters.get("do_sample") or parameters.get("seed") is not None)
        answer = {"generated_text": best.text}
        if parameters.get("details"):
            answer["details"] = _details(best, seeded)
            others = [found[key] for key in sorted(found) if key != (0, 0)]
            if others:
                answer["details"]["best_of_sequences"] = [
                    {"generated_text": r.text, **_details(r, seeded)} for r in others]
        return answer

    async def stream(request: Request, inputs: str, parameters: dict) -> StreamingResponse:
        params = ensemble_params(parameters, stream=True)
        seeded = bool(parameters.get("do_sample") or parameters.get("seed") is not None)
        responses = await started(chunks(request.app.state.client, [inputs], VALIDATION,
                                         stream=True, **params))

        async def events():
            text, index = "", 0
            try:
                async for chunk in responses:
                    text += chunk.text
                    details = chunk.token_details or [{"id": 0, "text": "", "special": True}]
                    for i, detail in enumerate(details):
                        index += 1
                        final = bool(chunk.finish_reason) and i == len(details) - 1
                        event = {"index": index, "token": _token(detail),
                                 "top_tokens": ([_token(t) for t in detail["top_tokens"]]
                                                if "top_tokens" in detail else None),
                                 "generated_text": text if final else None,
                                 "details": None}
                        if final:
                            event["details"] = {
                                "finish_reason": _FINISH.get(chunk.finish_reason, "length"),
                                "generated_tokens": chunk.num_output_tokens,
                                "seed": chunk.seed_used if seeded else None,
                                "prompt_tokens": chunk.num_input_tokens}
                        yield sse(event)
            except ApiError as error:  # after the 200 status: TGI's error event
                yield sse({"error": error.message, "error_type": error.kind})

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/")
    async def compat(request: Request):
        inputs, parameters, streamed = await body(request)
        if streamed:
            return await stream(request, inputs, parameters)
        return JSONResponse([await generate(request, inputs, parameters)])

    @api.post("/generate")
    async def generate_route(request: Request):
        inputs, parameters, _ = await body(request)
        return JSONResponse(await generate(request, inputs, parameters))

    @api.post("/generate_stream")
    async def generate_stream_route(request: Request):
        inputs, parameters, _ = await body(request)
        return await stream(request, inputs, parameters)

    @api.post("/tokenize")
    async def tokenize(request: Request):
        inputs, _, _ = await body(request)
        try:
            ids, tokens, offsets = await request.app.state.client.tokenize(inputs)
        except TextgenError as error:
            raise from_ensemble(error, VALIDATION) from None
        return JSONResponse([{"id": i, "text": t, "start": start, "stop": stop}
                             for i, t, (start, stop) in zip(ids, tokens, offsets)])

    @api.get("/info")
    async def info():
        from importlib.metadata import version
        return {"model_id": config.model_name, "model_dtype": None, "model_device_type": None,
                "max_input_tokens": config.max_input_tokens,
                "max_total_tokens": config.max_total_tokens,
                "router": "textgen", "version": version("textgen")}

    @api.get("/health")
    async def health(request: Request):
        """As TGI's: the model generates one token. Triton's own readiness cannot turn false
        when the engine has died or was stopped as stuck; this does (503), so a liveness probe
        on it restarts the server."""
        client = request.app.state.client
        if not await client.is_ready():
            raise ApiError(503, "the ensemble is not ready", "unavailable")
        try:
            await results(client, request, ["a"], VALIDATION, max_tokens=1)
        except ApiError as error:
            raise ApiError(503, f"the model cannot generate: {error.message}",
                           "unavailable") from None
        return JSONResponse({})

    return api
