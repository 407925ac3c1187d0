"""A small client for the `ensemble` model over gRPC: streaming and whole-result generation,
batches of prompts, and cancellation. Parameter names are the ensemble's input names."""
from __future__ import annotations

import json
import queue
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient

from textgen_backend.serving import contract

_SPECS = {spec.name: spec for spec in contract.ENSEMBLE_INPUTS}


class TextgenError(RuntimeError):
    """The server refused or failed the request; the message is the server's."""


@dataclass
class GenerationResult:
    """A sequence's generation: the whole of it, or (as a GenerationChunk) one response's part."""
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    stop_reason: str = ""
    stop_sequence: str = ""
    seed_used: int = 0
    cum_log_prob: float | None = None
    output_log_probs: list[float] = field(default_factory=list)
    token_details: list[dict] = field(default_factory=list)
    input_token_details: list[dict] = field(default_factory=list)


@dataclass
class GenerationChunk(GenerationResult):
    """One response: a text delta when streaming, the whole text otherwise."""
    batch_index: int = 0
    sequence_index: int = 0


class TextgenClient:
    def __init__(self, url: str = "localhost:8001", model: str = "ensemble", ssl: bool = False,
                 **grpc_options):
        self.model = model
        self._client = grpcclient.InferenceServerClient(url, ssl=ssl, **grpc_options)

    def close(self) -> None:
        self._client.close()

    def stream(self, prompts: str | list[str], stream: bool = True,
               **params) -> Iterator[GenerationChunk]:
        """Yields every response of one request until its final one.

        Leaving the loop early cancels the request on the server.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.stream_inputs(build_inputs(prompts, stream=stream, **params))

    def stream_inputs(self, inputs: list[grpcclient.InferInput]) -> Iterator[GenerationChunk]:
        """stream() for hand-built inputs (any tensor, any dtype: what the server checks)."""
        responses: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
        finished = False
        try:
            self._client.async_stream_infer(self.model, inputs, request_id=uuid.uuid4().hex,
                                            enable_empty_final_response=True)
            while True:
                result, error = responses.get()
                if error is not None:
                    finished = True
                    raise TextgenError(str(error))
                chunk, finished = parse_response(result)
                if chunk is not None:
                    yield chunk
                if finished:
                    return
        finally:
            self._client.stop_stream(cancel_requests=not finished)

    def generate(self, prompt: str, **params) -> GenerationResult:
        """The whole generation for one prompt (stream=False: a single response)."""
        return self.generate_batch([prompt], **params)[0]

    def generate_batch(self, prompts: list[str], stream: bool = False,
                       **params) -> list[GenerationResult]:
        """One request with several prompts (shared parameters); results in prompt order
        (the best sequence of each when num_return_sequences > 1)."""
        return [sequences[0] for sequences in self.generate_sequences(prompts, stream, **params)]

    def generate_sequences(self, prompts: list[str], stream: bool = False,
                           **params) -> list[list[GenerationResult]]:
        """For each prompt, its num_return_sequences results, best first."""
        results: dict[tuple[int, int], GenerationResult] = {}
        for chunk in self.stream(prompts, stream=stream, **params):
            merge(results.setdefault((chunk.batch_index, chunk.sequence_index),
                                     GenerationResult()), chunk)
        return [[results[key] for key in sorted(k for k in results if k[0] == row)]
                for row in range(len(prompts))]


def merge(result: GenerationResult, chunk: GenerationChunk) -> None:
    result.text += chunk.text
    result.output_ids += chunk.output_ids
    result.finish_reason = chunk.finish_reason or result.finish_reason
    result.stop_reason = chunk.stop_reason or result.stop_reason
    result.stop_sequence = chunk.stop_sequence or result.stop_sequence
    result.num_input_tokens = chunk.num_input_tokens
    result.num_cached_tokens = max(result.num_cached_tokens, chunk.num_cached_tokens)
    result.num_output_tokens = chunk.num_output_tokens
    result.seed_used = chunk.seed_used
    result.cum_log_prob = chunk.cum_log_prob
    result.output_log_probs += chunk.output_log_probs
    result.token_details += chunk.token_details
    result.input_token_details += chunk.input_token_details


_KINDS = {"TYPE_BOOL": ("a boolean", (bool, np.bool_)),
          "TYPE_INT32": ("an integer", (int, np.integer)),
          "TYPE_UINT64": ("an integer", (int, np.integer)),
          "TYPE_FP32": ("a number", (int, float, np.integer, np.floating)),
          "TYPE_STRING": ("a string", (str,))}
_RANGES = {"TYPE_INT32": (-2**31, 2**31 - 1), "TYPE_UINT64": (0, 2**64 - 1)}


def _checked(name: str, value, dtype: str):
    """value, if the tensor can hold it as it is (numpy would truncate 2.5 to an int32 2, or
    wrap a negative seed); else a TypeError naming the parameter."""
    kind, types = _KINDS[dtype]
    if not isinstance(value, types) or (dtype != "TYPE_BOOL" and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    low, high = _RANGES.get(dtype, (None, None))
    if low is not None and not low <= value <= high:
        raise TypeError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def build_inputs(prompts: list[str], **params) -> list[grpcclient.InferInput]:
    """InferInputs for the ensemble: [B, 1] per parameter ([B, N] for stop_words)."""
    batch = len(prompts)
    arrays = {"text_input": np.array([[p.encode()] for p in prompts], dtype=np.object_)}
    for name, value in params.items():
        if value is None:
            continue
        if name not in _SPECS:
            raise TypeError(f"unknown parameter {name!r}; known: {sorted(_SPECS)}")
        spec = _SPECS[name]
        if name in ("stop_words", "bad_words"):
            if isinstance(value, str) or not all(isinstance(s, str) for s in value):
                raise TypeError(f"{name} must be a list of strings, got {value!r}")
            row = [s.encode() for s in value]
            arrays[name] = np.array([row] * batch, dtype=np.object_).reshape(batch, len(row))
        elif name == "sampling_parameters":
            text = value if isinstance(value, str) else json.dumps(value)
            arrays[name] = np.array([[text.encode()]] * batch, dtype=np.object_)
        else:
            arrays[name] = np.full((batch, 1), _checked(name, value, spec.dtype),
                                   dtype=spec.numpy_dtype)
    inputs = []
    for name, array in arrays.items():
        infer_input = grpcclient.InferInput(name, list(array.shape), _SPECS[name].wire_dtype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def parse_response(result) -> tuple[GenerationChunk | None, bool]:
    """(its chunk, or None for the empty final response; whether it is the request's last) of
    one streamed ensemble response."""
    final = result.get_response().parameters["triton_final_response"].bool_param
    return (chunk_from_result(result) if result.as_numpy("text_output") is not None else None,
            final)


def chunk_from_result(result) -> GenerationChunk:
    """A GenerationChunk from one ensemble response (an InferResult)."""
    def scalar(name):
        return result.as_numpy(name).reshape(-1)[0]

    def vector(name):
        return result.as_numpy(name).reshape(-1).tolist()

    cum = vector("cum_log_probs")
    return GenerationChunk(
        text=scalar("text_output").decode(),
        output_ids=vector("output_ids"),
        finish_reason=scalar("finish_reason").decode(),
        num_input_tokens=int(scalar("num_input_tokens")),
        num_cached_tokens=int(scalar("num_cached_tokens")),
        num_output_tokens=int(scalar("num_output_tokens")),
        batch_index=int(scalar("batch_index")),
        sequence_index=int(scalar("sequence_index")),
        stop_reason=scalar("stop_reason").decode(),
        stop_sequence=scalar("stop_sequence").decode(),
        seed_used=int(scalar("seed_used")),
        cum_log_prob=cum[0] if cum else None,
        output_log_probs=vector("output_log_probs"),
        token_details=[json.loads(d) for d in vector("token_details")],
        input_token_details=[json.loads(d) for d in vector("input_token_details")],
    )
