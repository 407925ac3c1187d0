"""Request-level metrics: TGIS's tgi_request_* set, time to first token and inter-token latency.

GenerationService feeds it from submit() (Triton's model thread: arrival, validation, refusals)
and from its output thread (first tokens; every response, error and final). The values are
computed here, cheaply, and handed to a MetricsPublisher; the engine process never calls in.
A sequence's queue and inference times come from its first admission, which the scheduler
sends along with its first token (StepOutput.scheduled_at; time.monotonic() is one clock for
every process of the machine).

TGIS's conventions: a request counts once in tgi_request_count (kind "single", "batch" or
"stream") and in tgi_request_failure (err "validation", "conc_limit", "shutdown",
"generate" or "cancelled"); each sequence generated to its end counts once in tgi_request_success and in the
per-sequence histograms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from textgen_backend.serving.metrics import MetricsPublisher, Update


def request_kind(num_prompts: int, stream: bool) -> str:
    return "stream" if stream else "single" if num_prompts == 1 else "batch"


@dataclass
class _Request:
    kind: str
    received: float                          # time.monotonic() at the generator
    validated: float
    seq_ids: list[int]
    adapters: list[str]                      # each prompt's adapter name ("" = base model)
    first_token: dict[int, float] = field(default_factory=dict)      # by sequence id
    scheduled_at: dict[int, float] = field(default_factory=dict)     # by sequence id
    cancelled: bool = False


class RequestMetrics:
    def __init__(self, publisher: MetricsPublisher):
        self._publisher = publisher
        self._requests: dict[object, _Request] = {}   # by response sink
        self._awaiting_first: dict[int, _Request] = {}  # by sequence id

    # --- submit (Triton's model thread) -------------------------------------------------------

    def refused(self, inputs: dict[str, np.ndarray], err: str) -> None:
        """A request refused before it was queued (err: "validation", "conc_limit" or
        "shutdown")."""
        lengths = inputs.get("_input_lengths", np.zeros((0, 1), np.int32)).reshape(-1)
        stream = inputs.get("stream")
        streaming = stream is not None and stream.size > 0 and bool(stream.reshape(-1)[0])
        updates = self._arrival(request_kind(max(1, len(lengths)), streaming), lengths)
        updates.append(("tgi_request_failure", (err,), 1))
        self._publisher.publish(updates)

    def accepted(self, sink, prompts, seq_ids: list[int], received: float) -> None:
        """A request whose sequences are about to be queued; call it before the engine can see
        them. prompts: request.Prompt of each row (best_of may give a prompt several sequences)."""
        now = time.monotonic()
        kind = request_kind(len(prompts), prompts[0].params.stream)
        adapters = [p.adapter.name if p.adapter else "" for p in prompts]
        request = _Request(kind, received, now, list(seq_ids), adapters)
        # Registered before the output thread can see any of its tokens or responses.
        self._requests[sink] = request
        for seq_id in seq_ids:
            self._awaiting_first[seq_id] = request
        lengths = np.array([len(p.input_ids) for p in prompts])
        updates = self._arrival(kind, lengths)
        updates.append(("tgi_request_validation_duration", (), now - received))
        for prompt in prompts:
            updates.append(("tgi_request_input_length", (), len(prompt.input_ids)))
            updates.append(("tgi_request_max_new_tokens", (), prompt.params.stopping.max_tokens))
        updates += [("textgen_adapter_requests_total", (name,), 1) for name in adapters]
        self._publisher.publish(updates)

    @staticmethod
    def _arrival(kind: str, lengths: np.ndarray) -> list[Update]:
        updates: list[Update] = [("tgi_request_count", (kind,), 1),
                                 ("tgi_request_input_count", (), len(lengths))]
        updates += [("tgi_request_raw_input_length", (), int(n)) for n in lengths]
        return updates

    # --- output thread ------------------------------------------------------------------------

    def tokens_arrived(self, outputs) -> None:
        """The engine's StepOutputs, as the output thread receives them (first-token times)."""
        now = time.monotonic()
        for out in outputs:
            if out.new_token_ids:
                request = self._awaiting_first.pop(out.seq_id, None)
                if request is not None:
                    request.first_token[out.seq_id] = now
                    if out.scheduled_at is not None:
                        request.scheduled_at[out.seq_id] = out.scheduled_at

    def delivered(self, sends) -> None:
        """ProcessResult.sends: (sink, response, error, final) as they went to the clients."""
        now = time.monotonic()
        updates: list[Update] = []
        for sink, response, error, final in sends:
            request = self._requests.get(sink)
            if request is None:
                continue
            if error is not None:
                updates.append(("tgi_request_failure", ("generate",), 1))
            elif response.finish_reason == "cancelled":
                request.cancelled = True
            elif response.finish_reason:
                updates += self._finished(request, response, now)
            if final:
                del self._requests[sink]
                for seq_id in request.seq_ids:
                    self._awaiting_first.pop(seq_id, None)
                if request.cancelled:
                    updates.append(("tgi_request_failure", ("cancelled",), 1))
        if updates:
            self._publisher.publish(updates)

    @staticmethod
    def _finished(request: _Request, response, now: float) -> list[Update]:
        generated = response.num_output_tokens
        updates: list[Update] = [
            ("tgi_request_success", (response.finish_reason, request.kind), 1),
            ("tgi_request_duration", (), now - request.received),
            ("tgi_request_generated_tokens", (), generated),
            ("textgen_adapter_generated_tokens_total", (request.adapters[response.batch_index],),
             generated),
            ("tgi_request_total_tokens", (), response.num_input_tokens + generated),
        ]
        scheduled = request.scheduled_at.get(response.sequence_id)
        if scheduled is not None:
            inference = now - scheduled
            updates.append(("tgi_request_queue_duration", (), scheduled - request.validated))
            updates.append(("tgi_request_inference_duration", (), inference))
            if generated:
                updates.append(("tgi_request_mean_time_per_token_duration", (),
                                inference / generated))
        first = request.first_token.get(response.sequence_id)
        if first is not None:
            updates.append(("textgen_time_to_first_token_seconds", (), first - request.received))
            if generated > 1:
                updates.append(("textgen_inter_token_latency_seconds", (),
                                (now - first) / (generated - 1)))
        return updates
