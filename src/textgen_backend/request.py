"""Turning a request's input tensors into validated prompts and parameters.

Parameters come as optional tensors (TensorRT-LLM names) or as one `sampling_parameters` JSON
object (vLLM-backend names); giving the same parameter both ways is an error, as is an unknown
JSON key. A parameter tensor has one row per prompt or a single row shared by all prompts.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import numpy as np

from textgen_backend.config import EngineLimits
from textgen_backend.params import (DEFAULT_MAX_TOKENS, RequestError, RequestParams,
                                    SamplingParams, StoppingParams)

_SAMPLING_KEYS = ("temperature", "top_k", "top_p")
_FLOAT_KEYS = ("temperature", "top_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty")
_INT_KEYS = ("max_tokens", "min_tokens", "top_k", "seed")
_BOOL_KEYS = ("stream", "exclude_input_in_output", "ignore_eos")
# sampling_parameters JSON keys (vLLM names) -> our parameter names.
_JSON_KEYS = {**{k: k for k in _FLOAT_KEYS + _INT_KEYS + _BOOL_KEYS}, "stop": "stop_words"}


@dataclass(frozen=True)
class Prompt:
    """One row of a request: its token ids and the text they came from."""
    input_ids: list[int]
    text: str
    batch_index: int
    params: RequestParams


def parse_prompts(inputs: dict[str, np.ndarray], limits: EngineLimits,
                  max_stop_sequences: int) -> list[Prompt]:
    """Validates a generator request; raises RequestError naming the offending parameter."""
    if "_input_ids" not in inputs or "_input_lengths" not in inputs:
        raise RequestError("text_input is required")
    ids, lengths = inputs["_input_ids"], inputs["_input_lengths"].reshape(-1)
    texts = inputs.get("_prompt_text", np.array([[b""]] * len(lengths), dtype=object)).reshape(-1)
    batch = len(lengths)
    prompts = []
    for row in range(batch):
        values = _row_values(inputs, row, batch)
        params = _build_params(values, max_stop_sequences)
        n = int(lengths[row])
        _check_lengths(n, params.stopping.max_tokens, limits)
        prompts.append(Prompt(ids[row, :n].tolist(), texts[row].decode(), row, params))
    return prompts


def _check_lengths(num_input: int, max_tokens: int, limits: EngineLimits) -> None:
    if num_input < 1:
        raise RequestError("text_input is empty: the prompt must have at least one token")
    if num_input > limits.max_input_tokens:
        raise RequestError(f"input has {num_input} tokens but max_input_tokens is "
                           f"{limits.max_input_tokens}")
    if num_input + max_tokens > limits.max_total_tokens:
        raise RequestError(f"input tokens + max_tokens = {num_input + max_tokens} exceeds "
                           f"max_total_tokens {limits.max_total_tokens}")


def _row_values(inputs: dict[str, np.ndarray], row: int, batch: int) -> dict:
    """This row's parameters from tensors and the sampling_parameters JSON, merged."""
    values = {}
    for name, array in inputs.items():
        if name.startswith("_") or name == "sampling_parameters":
            continue
        if array.shape[0] not in (1, batch):
            raise RequestError(f"{name} has {array.shape[0]} rows but text_input has {batch}")
        cell = array[row if array.shape[0] == batch else 0]
        values[name] = _tensor_value(name, cell)
    if "min_length" in values:
        if "min_tokens" in values:
            raise RequestError("give min_tokens or min_length, not both")
        values["min_tokens"] = values.pop("min_length")
    if "sampling_parameters" in inputs:
        array = inputs["sampling_parameters"]
        if array.shape[0] not in (1, batch):
            raise RequestError(f"sampling_parameters has {array.shape[0]} rows but text_input "
                               f"has {batch}")
        raw = array[row if array.shape[0] == batch else 0].reshape(-1)[0]
        for key, value in _parse_json(raw).items():
            if key in values:
                raise RequestError(f"{key} is given both as a tensor and in sampling_parameters")
            values[key] = value
    return values


def _tensor_value(name: str, cell: np.ndarray):
    if name == "stop_words":
        return [s.decode() if isinstance(s, bytes) else str(s) for s in cell.reshape(-1)]
    flat = cell.reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold one value per prompt, got {flat.size}")
    return flat[0].item()


def _parse_json(raw) -> dict:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise RequestError("sampling_parameters must be a JSON object")
    unknown = sorted(set(parsed) - set(_JSON_KEYS))
    if unknown:
        raise RequestError(f"sampling_parameters has unknown keys {unknown} "
                           f"(known: {sorted(_JSON_KEYS)})")
    values = {}
    for key, value in parsed.items():
        name = _JSON_KEYS[key]
        if name == "stop_words":
            value = [value] if isinstance(value, str) else value
            if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise RequestError("sampling_parameters.stop must be a string or a list of strings")
        elif name == "top_k" and value == -1:
            value = 0  # vLLM disables top_k with -1
        values[name] = value
    return values


def _typed(values: dict, name: str, kind, default):
    if name not in values:
        return default
    value = values[name]
    if kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise RequestError(f"{name} must be a boolean, got {value!r}")
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise RequestError(f"{name} must be an integer, got {value}")
    return kind(value)


def _build_params(values: dict, max_stop_sequences: int) -> RequestParams:
    stops = [s for s in values.get("stop_words", []) if s]  # "" is how clients say "none"
    if len(stops) > max_stop_sequences:
        raise RequestError(f"{len(stops)} stop sequences given but max_stop_sequences is "
                           f"{max_stop_sequences}")
    temperature = _typed(values, "temperature", float, 1.0)
    do_sample = any(k in values for k in _SAMPLING_KEYS) and temperature != 0.0
    seed = _typed(values, "seed", int, None)
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_k=_typed(values, "top_k", int, 0),
        top_p=_typed(values, "top_p", float, 1.0),
        repetition_penalty=_typed(values, "repetition_penalty", float, 1.0),
        presence_penalty=_typed(values, "presence_penalty", float, 0.0),
        frequency_penalty=_typed(values, "frequency_penalty", float, 0.0),
        seed=secrets.randbits(63) if seed is None else seed,
    )
    stopping = StoppingParams(
        max_tokens=_typed(values, "max_tokens", int, DEFAULT_MAX_TOKENS),
        min_tokens=_typed(values, "min_tokens", int, 0),
        stop_sequences=tuple(stops),
        ignore_eos=_typed(values, "ignore_eos", bool, False),
    )
    return RequestParams(
        sampling=sampling,
        stopping=stopping,
        stream=_typed(values, "stream", bool, False),
        exclude_input_in_output=_typed(values, "exclude_input_in_output", bool, True),
    )
