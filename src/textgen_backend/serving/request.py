"""Turning a request's input tensors into validated prompts and parameters.

Parameters come as optional tensors (TensorRT-LLM / TGIS names) or as one
`sampling_parameters` JSON object (the same names, plus vLLM's aliases); giving the same
parameter both ways is an error, as is an unknown JSON key. A parameter tensor has one row per
prompt or a single row shared by all prompts.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Callable

import numpy as np

from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.prompt_tuning.store import PrefixRef
from textgen_backend.sampling.grammar import Grammar, grammar_from_request
from textgen_backend.serving import contract
from textgen_backend.config import EngineConfig, EngineLimits
from textgen_backend.sampling.params import (DEFAULT_MAX_TOKENS, DetailsParams, RequestError,
                                             RequestParams, SamplingParams, StoppingParams)

MAX_STOP_SEQUENCE_CHARS = 240  # TGIS's limit on one stop sequence

# Parameters that switch greedy decoding to sampling (unless temperature is 0).
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "typical_p", "min_p")
_LIST_KEYS = ("stop_words", "bad_words")
_ADAPTER_KEYS = ("adapter_id", "adapter_source", "adapter_parameters")
_STRING_KEYS = _ADAPTER_KEYS + ("prefix_id", "grammar", "guided_decoding_guide_type",
                                "guided_decoding_guide")
# vLLM's constraint keys, only in sampling_parameters; their JSON values pass through as given
_CONSTRAINT_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                    "structured_outputs", "grammar")
_TENSOR_KEYS = {spec.name for spec in contract.GENERATION_PARAMETERS} - {"sampling_parameters"}
# sampling_parameters JSON: every tensor parameter by its own name, and vLLM's aliases.
_JSON_ALIASES = {"stop": "stop_words", "n": "num_return_sequences",
                 "include_stop_str_in_output": "include_stop_sequence", "logprobs": "top_n_tokens",
                 "lora_name": "adapter_id"}
_JSON_KEYS = {**{k: k for k in _TENSOR_KEYS - {"min_length"}}, **_JSON_ALIASES,
              **{k: k for k in _CONSTRAINT_KEYS}}
_DTYPES = {spec.name: spec.dtype for spec in contract.GENERATION_PARAMETERS}


@dataclass(frozen=True)
class Prompt:
    """One row of a request: its token ids and the text they came from."""
    input_ids: list[int]
    text: str
    batch_index: int
    params: RequestParams
    adapter: AdapterRef | None = None
    prefix: PrefixRef | None = None    # a soft prompt before input_ids
    grammar: Grammar | None = None     # the constraint its output must follow


def parse_prompts(inputs: dict[str, np.ndarray], limits: EngineLimits, config: EngineConfig,
                  encode_words: Callable[[str], list[int]],
                  resolve_adapter: Callable[[str, str, str], AdapterRef | None],
                  resolve_prefix: Callable[[str], PrefixRef | None]) -> list[Prompt]:
    """Validates a generator request; raises RequestError naming the offending parameter.

    encode_words tokenizes a bad word (no special tokens); resolve_adapter(adapter_id,
    adapter_source, adapter_parameters) checks a row's adapter (None: the base model);
    resolve_prefix(prefix_id) its soft prompt (None: none)."""
    if "_input_ids" not in inputs or "_input_lengths" not in inputs:
        raise RequestError("text_input is required")
    ids, lengths = inputs["_input_ids"], inputs["_input_lengths"].reshape(-1)
    texts = inputs.get("_prompt_text", np.array([[b""]] * len(lengths), dtype=object)).reshape(-1)
    batch = len(lengths)
    prompts = []
    for row in range(batch):
        values = _row_values(inputs, row, batch)
        adapter = resolve_adapter(*(values.pop(key, "") for key in _ADAPTER_KEYS))
        prefix = resolve_prefix(values.pop("prefix_id", ""))
        grammar = grammar_from_request(values, limits.grammar_support)
        n = int(lengths[row])
        if _typed(values, "max_tokens_to_context", bool, False):
            if "max_tokens" in values:
                raise RequestError("give max_tokens or max_tokens_to_context, not both")
            virtual = prefix.num_virtual_tokens if prefix else 0
            # an input too long leaves 1: _check_lengths then names the input's length
            values["max_tokens"] = max(1, limits.max_total_tokens - n - virtual)
        values.pop("max_tokens_to_context", None)
        params = _build_params(values, config, encode_words)
        _check_lengths(n, params.stopping.max_tokens, limits, prefix)
        prompts.append(Prompt(ids[row, :n].tolist(), texts[row].decode(), row, params, adapter,
                              prefix, grammar))
    return prompts


def _check_lengths(num_input: int, max_tokens: int, limits: EngineLimits,
                   prefix: PrefixRef | None) -> None:
    """A soft prompt's virtual tokens count as input tokens (TGIS)."""
    if num_input < 1:
        raise RequestError("text_input is empty: the prompt must have at least one token")
    virtual = prefix.num_virtual_tokens if prefix else 0
    counted = (f" (with the {virtual} virtual tokens of prefix_id {prefix.prefix_id!r})"
               if prefix else "")
    if num_input + virtual > limits.max_input_tokens:
        raise RequestError(f"input has {num_input + virtual} tokens{counted} but "
                           f"max_input_tokens is {limits.max_input_tokens}")
    if num_input + virtual + max_tokens > limits.max_total_tokens:
        raise RequestError(f"input tokens{counted} + max_tokens = "
                           f"{num_input + virtual + max_tokens} exceeds max_total_tokens "
                           f"{limits.max_total_tokens}")


def _row_values(inputs: dict[str, np.ndarray], row: int, batch: int) -> dict:
    """This row's parameters from tensors and the sampling_parameters JSON, merged."""
    values = {}
    for name, array in inputs.items():
        if name.startswith("_") or name == "sampling_parameters":
            continue
        values[name] = _tensor_value(name, _row(array, name, row, batch))
    if "min_length" in values:
        if "min_tokens" in values:
            raise RequestError("give min_tokens or min_length, not both")
        values["min_tokens"] = values.pop("min_length")
    if "sampling_parameters" in inputs:
        raw = _row(inputs["sampling_parameters"], "sampling_parameters", row, batch).reshape(-1)[0]
        for key, value in _parse_json(raw).items():
            if key in values:
                raise RequestError(f"{key} is given both as a tensor and in sampling_parameters")
            values[key] = value
    return values


def _row(array: np.ndarray, name: str, row: int, batch: int) -> np.ndarray:
    if array.shape[0] not in (1, batch):
        raise RequestError(f"{name} has {array.shape[0]} rows but text_input has {batch}")
    return array[row if array.shape[0] == batch else 0]


def _tensor_value(name: str, cell: np.ndarray):
    if name in _LIST_KEYS:
        try:
            return [s.decode() if isinstance(s, bytes) else str(s) for s in cell.reshape(-1)]
        except UnicodeDecodeError:
            raise RequestError(f"{name} must be valid UTF-8") from None
    flat = cell.reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold one value per prompt, got {flat.size}")
    if name in _STRING_KEYS:
        try:
            return flat[0].decode() if isinstance(flat[0], bytes) else str(flat[0])
        except UnicodeDecodeError:
            raise RequestError(f"{name} must be valid UTF-8") from None
    return flat[0].item()


def _parse_json(raw) -> dict:
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise RequestError("sampling_parameters must be valid UTF-8") from None
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
        if name in _LIST_KEYS:
            value = [value] if isinstance(value, str) else value
            if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise RequestError(f"sampling_parameters.{key} must be a string or a list of "
                                   "strings")
        elif name in _CONSTRAINT_KEYS:
            pass  # a schema object, a choice list or a text: grammar.py checks it
        elif name in _STRING_KEYS:
            if name == "adapter_parameters" and isinstance(value, dict):
                value = json.dumps(value)  # an object in place of its JSON text
            if not isinstance(value, str):
                raise RequestError(f"sampling_parameters.{key} must be a string")
        elif isinstance(value, str):
            value = _from_string(key, name, value)
        if name == "top_k" and value == -1:
            value = 0  # vLLM disables top_k with -1
        if key == "logprobs" and value is not None:
            values["return_log_probs"] = True  # vLLM: logprobs=n also returns the chosen's
        if value is not None:
            values[name] = value
    return values


def _from_string(key: str, name: str, text: str):
    """A number or boolean sent as a JSON string, as genai-perf's vLLM client does (Triton's
    vLLM backend converts them the same way)."""
    dtype = _DTYPES[name]
    try:
        if dtype == "TYPE_BOOL":
            return {"true": True, "false": False}[text.strip().lower()]
        return float(text) if dtype == "TYPE_FP32" else int(text)
    except (KeyError, ValueError):
        kind = {"TYPE_BOOL": "a boolean", "TYPE_FP32": "a number"}.get(dtype, "an integer")
        raise RequestError(f"sampling_parameters.{key} must be {kind}, got {text!r}") from None


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


def _word_list(values: dict, name: str) -> list[str]:
    return [w for w in values.get(name, []) if w]  # "" is how clients say "none"


def _build_params(values: dict, config: EngineConfig,
                  encode_words: Callable[[str], list[int]]) -> RequestParams:
    stops = _word_list(values, "stop_words")
    if len(stops) > config.max_stop_sequences:
        raise RequestError(f"{len(stops)} stop sequences given but max_stop_sequences is "
                           f"{config.max_stop_sequences}")
    for stop in stops:
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise RequestError(f"a stop sequence has {len(stop)} characters but the limit is "
                               f"{MAX_STOP_SEQUENCE_CHARS}")
    temperature = _typed(values, "temperature", float, 1.0)
    do_sample = any(k in values for k in _SAMPLING_KEYS) and temperature != 0.0
    seed = _typed(values, "seed", int, None)
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_k=_typed(values, "top_k", int, 0),
        top_p=_typed(values, "top_p", float, 1.0),
        typical_p=_typed(values, "typical_p", float, 1.0),
        min_p=_typed(values, "min_p", float, 0.0),
        repetition_penalty=_typed(values, "repetition_penalty", float, 1.0),
        presence_penalty=_typed(values, "presence_penalty", float, 0.0),
        frequency_penalty=_typed(values, "frequency_penalty", float, 0.0),
        seed=secrets.randbits(63) if seed is None else seed,
        length_penalty=_length_penalty(values),
        bad_words_ids=tuple(tuple(ids) for ids in map(encode_words, _word_list(values, "bad_words"))
                            if ids),
        watermark=_typed(values, "watermark", bool, False),
    )
    stopping = StoppingParams(
        max_tokens=_typed(values, "max_tokens", int, DEFAULT_MAX_TOKENS),
        min_tokens=_typed(values, "min_tokens", int, 0),
        stop_sequences=tuple(stops),
        include_stop_sequence=_typed(values, "include_stop_sequence", bool, True),
        ignore_eos=_typed(values, "ignore_eos", bool, False),
        time_limit_ms=_typed(values, "time_limit_ms", int, None),
    )
    top_n = _typed(values, "top_n_tokens", int, 0)
    if not 0 <= top_n <= config.max_top_n_tokens:
        raise RequestError(f"top_n_tokens must be in [0, max_top_n_tokens={config.max_top_n_tokens}]"
                           f", got {top_n}")
    details = DetailsParams(log_probs=_typed(values, "return_log_probs", bool, False),
                            top_n_tokens=top_n,
                            input_details=_typed(values, "decoder_input_details", bool, False))
    stream = _typed(values, "stream", bool, False)
    best_of, returned = _candidates(values, config, do_sample, stream)
    return RequestParams(sampling=sampling, stopping=stopping, details=details, stream=stream,
                         exclude_input_in_output=_typed(values, "exclude_input_in_output", bool,
                                                        True),
                         best_of=best_of, num_return_sequences=returned)


def _length_penalty(values: dict) -> tuple[int, float] | None:
    start = _typed(values, "length_penalty_start_index", int, None)
    decay = _typed(values, "length_penalty_decay_factor", float, None)
    if (start is None) != (decay is None):
        raise RequestError("length_penalty_start_index and length_penalty_decay_factor must be "
                           "given together")
    return None if start is None else (start, decay)


def _candidates(values: dict, config: EngineConfig, do_sample: bool,
                stream: bool) -> tuple[int, int]:
    """(best_of, num_return_sequences), validated as TGI does."""
    returned = _typed(values, "num_return_sequences", int, 1)
    best_of = _typed(values, "best_of", int, max(returned, 1))
    if not 1 <= best_of <= config.max_best_of:
        raise RequestError(f"best_of must be in [1, max_best_of={config.max_best_of}], "
                           f"got {best_of}")
    if not 1 <= returned <= best_of:
        raise RequestError(f"num_return_sequences must be in [1, best_of={best_of}], "
                           f"got {returned}")
    if best_of > 1 and not do_sample:
        raise RequestError(f"best_of={best_of} needs sampling: give temperature > 0, top_k, "
                           "top_p, typical_p or min_p")
    if best_of > 1 and stream:
        raise RequestError(f"best_of={best_of} cannot be streamed: set stream to false")
    return best_of, returned
