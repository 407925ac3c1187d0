"""Turns the engine's token outputs into text responses: incremental detokenization, stop
sequences, streaming deltas or one whole result, and the request's single final response.

Runs on the service's output thread, never on the engine thread. Tokens that arrive for a
sequence after it stopped on a stop sequence (the engine learns of it a step later) are dropped.

Every streamed response costs Triton (and the ensemble's detokenizer step) a fixed amount of
work, so streams share a budget of responses per second: a stream's new text goes out at once
when few streams are active, and is coalesced into fewer, longer deltas when many are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from textgen_backend.contract import GenerationResponse
from textgen_backend.detokenizer import IncrementalDetokenizer
from textgen_backend.request import Prompt
from textgen_backend.scheduler import StepOutput
from textgen_backend.stopping import StopSequenceMatcher


class ResponseSink(Protocol):
    """Where a request's responses go (the Triton response sender, or a test's list)."""

    def send(self, response: GenerationResponse | None, error: str | None, final: bool) -> None: ...

    def is_cancelled(self) -> bool: ...


@dataclass
class SequenceText:
    seq_id: int
    prompt: Prompt
    detokenizer: IncrementalDetokenizer
    stop: StopSequenceMatcher | None
    prefix: str                        # the prompt text when it is echoed, sent once
    num_output_tokens: int = 0
    text: list[str] = field(default_factory=list)   # not yet sent
    ids: list[int] = field(default_factory=list)    # not yet sent
    finish_reason: str = ""
    last_sent: float | None = None                  # time.monotonic() of the last response


@dataclass
class RequestState:
    sink: ResponseSink
    stream: bool
    sequences: dict[int, SequenceText]
    num_unfinished: int
    failed: bool = False
    cancel_requested: bool = False


@dataclass
class ProcessResult:
    sends: list[tuple[ResponseSink, GenerationResponse | None, str | None, bool]]
    stop_seq_ids: list[int]            # sequences the engine must stop (stop sequence matched)
    finished_requests: list[RequestState]


class OutputProcessor:
    def __init__(self, tokenizer, responses_per_second: float):
        self.tokenizer = tokenizer
        self.responses_per_second = responses_per_second
        self.requests: dict[int, RequestState] = {}   # by sequence id
        self.unsent: dict[int, RequestState] = {}     # streams holding coalesced text

    def register(self, sink: ResponseSink, prompts: list[Prompt], seq_ids: list[int]) -> None:
        sequences = {}
        for seq_id, prompt in zip(seq_ids, prompts):
            stops = prompt.params.stopping.stop_sequences
            sequences[seq_id] = SequenceText(
                seq_id=seq_id,
                prompt=prompt,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt.input_ids),
                stop=StopSequenceMatcher(stops) if stops else None,
                prefix="" if prompt.params.exclude_input_in_output else prompt.text,
            )
        state = RequestState(sink, prompts[0].params.stream, sequences, len(sequences))
        for seq_id in seq_ids:
            self.requests[seq_id] = state

    def process(self, outputs: list[StepOutput]) -> ProcessResult:
        result = ProcessResult([], [], [])
        touched: dict[int, RequestState] = {}
        for out in outputs:
            state = self.requests.get(out.seq_id)
            if state is None or state.failed:
                continue
            seq = state.sequences[out.seq_id]
            if seq.finish_reason:
                continue
            if out.error is not None:
                seq.finish_reason = "error"
                self._fail(state, out.error, result)
                continue
            if self._advance(seq, out):
                result.stop_seq_ids.append(seq.seq_id)
            touched[out.seq_id] = state
        now = time.monotonic()
        interval = self.stream_interval()
        for seq_id, state in touched.items():
            seq = state.sequences[seq_id]
            if seq.finish_reason or (state.stream and self._due(seq, now, interval)):
                self._respond(state, seq, result, now)
            elif state.stream:
                self.unsent[seq_id] = state
        return result

    def stream_interval(self) -> float:
        """Seconds between two responses of one stream that keep all streams in the budget."""
        return len(self.requests) / self.responses_per_second

    def flush_due(self) -> ProcessResult:
        """Sends the coalesced text whose time has come."""
        result = ProcessResult([], [], [])
        now, interval = time.monotonic(), self.stream_interval()
        for seq_id, state in list(self.unsent.items()):
            if self._due(state.sequences[seq_id], now, interval):
                self._respond(state, state.sequences[seq_id], result, now)
        return result

    @staticmethod
    def _due(seq: SequenceText, now: float, interval: float) -> bool:
        return seq.last_sent is None or now - seq.last_sent >= interval

    def newly_cancelled(self) -> list[list[int]]:
        """Sequence ids of each request whose client cancelled since the last call."""
        states = {id(s): s for s in self.requests.values()}.values()
        cancelled = []
        for state in states:
            if not state.cancel_requested and state.sink.is_cancelled():
                state.cancel_requested = True
                cancelled.append([i for i, s in state.sequences.items() if not s.finish_reason])
        return cancelled

    def seq_ids_of_request(self, seq_id: int) -> list[int]:
        state = self.requests.get(seq_id)
        return list(state.sequences) if state else []

    def _advance(self, seq: SequenceText, out: StepOutput) -> bool:
        """Adds out's tokens to seq; True when a stop sequence matched."""
        stopping = seq.prompt.params.stopping
        if seq.stop is None:
            seq.num_output_tokens += len(out.new_token_ids)
            seq.ids += out.new_token_ids
            seq.text.append(seq.detokenizer.step(out.new_token_ids))
        else:
            # Token by token: the token completing a stop sequence is the last one sent.
            for token in out.new_token_ids:
                seq.num_output_tokens += 1
                seq.ids.append(token)
                delta = seq.detokenizer.step([token])
                can_stop = seq.num_output_tokens >= stopping.min_tokens
                emitted, matched = seq.stop.feed(delta, can_stop)
                seq.text.append(emitted)
                if matched is not None:
                    seq.finish_reason = "stop"
                    return True
        if out.finish_reason:
            seq.finish_reason = out.finish_reason
            tail = seq.detokenizer.flush()
            if seq.stop is not None:
                emitted, matched = seq.stop.feed(tail, True)
                tail = emitted if matched is not None else emitted + seq.stop.flush()
            seq.text.append(tail)
        return False

    def _respond(self, state: RequestState, seq: SequenceText, result: ProcessResult,
                 now: float) -> None:
        finished = bool(seq.finish_reason)
        self.unsent.pop(seq.seq_id, None)
        seq.last_sent = now
        if finished:
            state.num_unfinished -= 1
        text = seq.prefix + "".join(seq.text)
        seq.prefix, seq.text = "", []
        response = GenerationResponse(
            text=text, output_ids=seq.ids, finish_reason=seq.finish_reason,
            num_input_tokens=len(seq.prompt.input_ids), num_output_tokens=seq.num_output_tokens,
            batch_index=seq.prompt.batch_index, sequence_id=seq.seq_id)
        seq.ids = []
        final = state.num_unfinished == 0
        result.sends.append((state.sink, response, None, final))
        if final:
            self._forget(state, result)

    def _fail(self, state: RequestState, error: str, result: ProcessResult) -> None:
        state.failed = True
        result.sends.append((state.sink, None, error, True))
        result.stop_seq_ids += [i for i, s in state.sequences.items() if not s.finish_reason]
        self._forget(state, result)

    def _forget(self, state: RequestState, result: ProcessResult) -> None:
        for seq_id in state.sequences:
            self.requests.pop(seq_id, None)
            self.unsent.pop(seq_id, None)
        result.finished_requests.append(state)
