"""Turns the engine's token outputs into responses: incremental detokenization, stop sequences,
time limits, token details, best-of selection, streaming deltas or one whole result, and the
request's single final response.

Runs on the service's output thread, never in the engine process. Tokens that arrive for a
sequence after it stopped (a stop sequence or time limit: the engine learns of it a step
later) are dropped.

Every streamed response costs Triton (and the ensemble's detokenizer step) a fixed amount of
work, so streams share a budget of responses per second: a stream's new text goes out at once
when few streams are active, and is coalesced into fewer, longer deltas when many are.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

from textgen_backend.serving.contract import GenerationResponse
from textgen_backend.serving.detokenizer import IncrementalDetokenizer
from textgen_backend.serving.request import Prompt
from textgen_backend.engine.scheduler import StepOutput, TokenLogprob
from textgen_backend.serving.stopping import StopSequenceMatcher

# finish_reason -> TGIS stop reason
STOP_REASONS = {"length": "max_tokens", "eos_token": "eos_token", "stop": "stop_sequence",
                "time_limit": "time_limit", "cancelled": "cancelled"}


# Requests whose client is asked per cancellation poll (round-robin over the rest): asking is a
# round trip to Triton (0.16-0.25 ms on the CPU machine), so asking every request at every
# poll cost a core's worth at a few hundred streams. Inside the ensemble the answer only ever
# changes through the detokenizer's relay, which reaches the engine at once anyway.
CANCEL_CHECKS_PER_POLL = 16


class ResponseSink(Protocol):
    """Where a request's responses go (the Triton response sender, or a test's list)."""

    def send(self, response: GenerationResponse | None, error: str | None, final: bool) -> None: ...

    def is_cancelled(self) -> bool: ...


@dataclass
class Candidate:
    """Where one generated sequence belongs: its prompt, and which of best_of it is."""
    prompt: Prompt
    index: int                         # 0..best_of-1
    seed: int
    deadline: float | None             # time.monotonic() past which it stops (time_limit_ms)


@dataclass
class SequenceText:
    seq_id: int
    candidate: Candidate
    detokenizer: IncrementalDetokenizer
    stop: StopSequenceMatcher | None
    prefix: str                        # the prompt text when it is echoed, sent once
    num_output_tokens: int = 0
    text: list[str] = field(default_factory=list)     # not yet sent
    ids: list[int] = field(default_factory=list)      # not yet sent
    logprobs: list[float] = field(default_factory=list)  # of `ids`
    details: list[str] = field(default_factory=list)  # JSON per token of `ids`
    input_details: list[str] = field(default_factory=list)  # sent with the first response
    cum_logprob: float = 0.0
    num_cached_tokens: int = 0
    finish_reason: str = ""
    stop_sequence: str = ""
    last_sent: float | None = None                    # time.monotonic() of the last response

    @property
    def prompt(self) -> Prompt:
        return self.candidate.prompt


@dataclass
class RequestState:
    sink: ResponseSink
    stream: bool
    sequences: dict[int, SequenceText]
    num_unfinished: int
    finished_candidates: dict[int, list[tuple[float, GenerationResponse]]] = field(
        default_factory=dict)  # by batch index, for best_of > 1
    failed: bool = False
    cancel_requested: bool = False


@dataclass
class ProcessResult:
    sends: list[tuple[ResponseSink, GenerationResponse | None, str | None, bool]]
    stop_seq_ids: list[int]            # sequences the engine must stop (stop sequence, time)
    finished_requests: list[RequestState]


class OutputProcessor:
    def __init__(self, tokenizer, responses_per_second: float):
        self.tokenizer = tokenizer
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self.responses_per_second = responses_per_second
        self.requests: dict[int, RequestState] = {}   # by sequence id
        self.unsent: dict[int, RequestState] = {}     # streams holding coalesced text
        self._cancel_cursor = 0                          # where the next poll starts

    def register(self, sink: ResponseSink, candidates: list[Candidate], seq_ids: list[int]) -> None:
        """candidates[i] is what sequence seq_ids[i] generates for."""
        sequences = {}
        for seq_id, candidate in zip(seq_ids, candidates):
            params = candidate.prompt.params
            stops = params.stopping.stop_sequences
            sequences[seq_id] = SequenceText(
                seq_id=seq_id,
                candidate=candidate,
                detokenizer=IncrementalDetokenizer(self.tokenizer, candidate.prompt.input_ids),
                stop=StopSequenceMatcher(stops, params.stopping.include_stop_sequence)
                if stops else None,
                prefix="" if params.exclude_input_in_output else candidate.prompt.text,
            )
        state = RequestState(sink, candidates[0].prompt.params.stream, sequences, len(sequences))
        for seq_id in seq_ids:
            self.requests[seq_id] = state

    def process(self, outputs: list[StepOutput]) -> ProcessResult:
        result = ProcessResult([], [], [])
        touched: dict[int, RequestState] = {}
        now = time.monotonic()
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
            if self._advance(seq, out) or self._past_deadline(seq, now):
                result.stop_seq_ids.append(seq.seq_id)
            touched[out.seq_id] = state
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
        """Sends the coalesced text whose time has come, and ends sequences past their time
        limit that got no token since (e.g. still queued)."""
        result = ProcessResult([], [], [])
        now, interval = time.monotonic(), self.stream_interval()
        for seq_id, state in list(self.requests.items()):
            seq = state.sequences[seq_id]
            if state.failed or seq.finish_reason:
                continue
            if self._past_deadline(seq, now):
                result.stop_seq_ids.append(seq_id)
                self._respond(state, seq, result, now)
            elif seq_id in self.unsent and self._due(seq, now, interval):
                self._respond(state, seq, result, now)
        return result

    def newly_cancelled(self) -> list[list[int]]:
        """Sequence ids of each request whose client cancelled, among the next
        CANCEL_CHECKS_PER_POLL requests (in order of arrival, wrapping around)."""
        states = [s for s in {id(s): s for s in self.requests.values()}.values()
                  if not s.cancel_requested]
        if not states:
            return []
        start = self._cancel_cursor % len(states)
        chosen = (states[start:] + states[:start])[:CANCEL_CHECKS_PER_POLL]
        self._cancel_cursor = start + len(chosen)
        cancelled = []
        for state in chosen:
            if state.sink.is_cancelled():
                state.cancel_requested = True
                cancelled.append([i for i, s in state.sequences.items() if not s.finish_reason])
        return cancelled

    def seq_ids_of_request(self, seq_id: int) -> list[int]:
        state = self.requests.get(seq_id)
        return list(state.sequences) if state else []

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _due(seq: SequenceText, now: float, interval: float) -> bool:
        return seq.last_sent is None or now - seq.last_sent >= interval

    def _past_deadline(self, seq: SequenceText, now: float) -> bool:
        """Finishes seq with time_limit once its deadline has passed (text so far is kept)."""
        deadline = seq.candidate.deadline
        if seq.finish_reason or deadline is None or now < deadline:
            return False
        self._finish(seq, "time_limit")
        return True

    def _finish(self, seq: SequenceText, reason: str) -> None:
        seq.finish_reason = reason
        tail = seq.detokenizer.flush()
        if seq.stop is not None:
            emitted, matched = seq.stop.feed(tail, True)
            if matched is not None:
                seq.finish_reason, seq.stop_sequence = "stop", matched
                tail = emitted
            else:
                tail = emitted + seq.stop.flush()
        seq.text.append(tail)

    def _advance(self, seq: SequenceText, out: StepOutput) -> bool:
        """Adds out's tokens to seq; True when a stop sequence matched."""
        if out.scheduled_at is not None:  # its first token
            seq.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            seq.input_details = [self._detail_json(token, lp)
                                 for token, lp in zip(seq.prompt.input_ids, out.prompt_logprobs)]
        stopping = seq.prompt.params.stopping
        logprobs = out.logprobs or [None] * len(out.new_token_ids)
        if seq.stop is None:
            for token, lp in zip(out.new_token_ids, logprobs):
                self._add_token(seq, token, lp)
            seq.text.append(seq.detokenizer.step(out.new_token_ids))
        else:
            # Token by token: the token completing a stop sequence is the last one sent.
            for token, lp in zip(out.new_token_ids, logprobs):
                self._add_token(seq, token, lp)
                can_stop = seq.num_output_tokens >= stopping.min_tokens
                emitted, matched = seq.stop.feed(seq.detokenizer.step([token]), can_stop)
                seq.text.append(emitted)
                if matched is not None:
                    seq.finish_reason, seq.stop_sequence = "stop", matched
                    return True
        if out.finish_reason:
            self._finish(seq, out.finish_reason)
        return False

    def _add_token(self, seq: SequenceText, token: int, lp: TokenLogprob | None) -> None:
        seq.num_output_tokens += 1
        seq.ids.append(token)
        if lp is not None:
            seq.cum_logprob += lp.logprob
            details = seq.prompt.params.details
            if details.log_probs:
                seq.logprobs.append(lp.logprob)
            if details.per_token:
                seq.details.append(self._detail_json(token, lp))

    def _detail_json(self, token: int, lp: TokenLogprob | None) -> str:
        """One token's details: {"id", "text", "logprob", "rank", "special", "top_tokens"}."""
        entry = {"id": token, "text": self._token_text(token),
                 "logprob": None if lp is None else lp.logprob,
                 "rank": None if lp is None else lp.rank,
                 "special": token in self._special_ids}
        if lp is not None and lp.top:
            entry["top_tokens"] = [{"id": i, "text": self._token_text(i), "logprob": p}
                                   for i, p in lp.top]
        return json.dumps(entry, ensure_ascii=False)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _respond(self, state: RequestState, seq: SequenceText, result: ProcessResult,
                 now: float) -> None:
        finished = bool(seq.finish_reason)
        self.unsent.pop(seq.seq_id, None)
        seq.last_sent = now
        params = seq.prompt.params
        response = GenerationResponse(
            text=seq.prefix + "".join(seq.text), output_ids=seq.ids,
            finish_reason=seq.finish_reason, num_input_tokens=len(seq.prompt.input_ids),
            num_output_tokens=seq.num_output_tokens, batch_index=seq.prompt.batch_index,
            sequence_id=seq.seq_id, seed=seq.candidate.seed,
            num_cached_tokens=seq.num_cached_tokens,
            stop_reason=STOP_REASONS.get(seq.finish_reason, ""), stop_sequence=seq.stop_sequence,
            cum_log_prob=seq.cum_logprob if params.details.log_probs else None,
            output_log_probs=seq.logprobs, token_details=seq.details,
            input_token_details=seq.input_details)
        seq.prefix, seq.text, seq.ids, seq.logprobs, seq.details = "", [], [], [], []
        seq.input_details = []
        if finished:
            state.num_unfinished -= 1
        if params.best_of > 1:
            if finished:
                self._choose_best(state, seq, response, result)
            return
        final = state.num_unfinished == 0
        result.sends.append((state.sink, response, None, final))
        if final:
            self._forget(state, result)

    def _choose_best(self, state: RequestState, seq: SequenceText, response: GenerationResponse,
                     result: ProcessResult) -> None:
        """Holds finished candidates of a prompt until all are in, then sends the best
        num_return_sequences by cumulative logprob (sequence_index 0 = the best)."""
        params = seq.prompt.params
        finished = state.finished_candidates.setdefault(seq.prompt.batch_index, [])
        finished.append((seq.cum_logprob, response))
        if len(finished) < params.best_of:
            return
        best = sorted(finished, key=lambda item: -item[0])[:params.num_return_sequences]
        for index, (_, chosen) in enumerate(best):
            chosen.sequence_index = index
            final = state.num_unfinished == 0 and index == len(best) - 1
            result.sends.append((state.sink, chosen, None, final))
        if state.num_unfinished == 0:
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
