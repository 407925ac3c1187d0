"""The generation service behind the `generator` model: the engine in a process of its own
(engine_process.py) and an output thread that turns its tokens into responses.

submit() only validates and sends the sequences to the engine process, which runs steps back
to back while there is work; the output thread detokenizes, applies stop sequences, sends
responses (one final response per request, from there alone) and notices cancelled clients.
Neither ever waits for the other inside a step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

import numpy as np

from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.models.config import ModelConfig
from textgen_backend.prompt_tuning.store import PrefixStore
from textgen_backend.serving.drain import DrainFiles
from textgen_backend.serving.engine_process import EngineProcess, EngineProcessDied
from textgen_backend.serving.metrics import EngineMetrics, MetricsPublisher
from textgen_backend.serving.output_processor import (Candidate, OutputProcessor, ProcessResult,
                                                      ResponseSink)
from textgen_backend.sampling.params import RequestError
from textgen_backend.serving.request import Prompt, parse_prompts
from textgen_backend.serving.request_metrics import RequestMetrics
from textgen_backend.engine.scheduler import StepOutput
from textgen_backend.engine.sequence import Sequence
from textgen_backend.serving.tokenizer import load_tokenizer
from textgen_backend.weights.loading import resolve_model_dir

logger = logging.getLogger("textgen")

_CANCEL_POLL_SECONDS = 0.05


class GenerationService:
    def __init__(self, config: EngineConfig, metrics_sink, device: str | None = None,
                 drain: DrainFiles | None = None):
        """metrics_sink receives every metric update (metrics.TritonMetrics in the server), on a
        thread of its own; drain: where a supervisor asks for a graceful shutdown."""
        self.config = config
        self._drain_files = drain
        if drain is not None:
            drain.clear()
        self._drain_deadline: float | None = None   # set once a drain was requested
        self._drain_cancelled = False
        self._publisher = MetricsPublisher(metrics_sink)
        self._request_metrics = RequestMetrics(self._publisher)
        self._engine_metrics = EngineMetrics()
        model_dir = resolve_model_dir(config.model_id, config.revision,
                                      config.huggingface_hub_cache)
        self.outputs = OutputProcessor(load_tokenizer(model_dir, config.tokenizer_config_path,
                                                      config.trust_remote_code),
                                       config.stream_responses_per_second)
        model_config = ModelConfig.from_dir(model_dir)
        self._adapters = AdapterCatalog(config, model_config)
        self._prefixes = PrefixStore(config.prefix_store_path, model_config.hidden_size)
        self._results: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._num_active = 0          # sequences submitted and not yet finished
        self._next_seq_id = 1
        self._engine_error: str | None = None   # set when the engine process died
        self._last_step_at = time.monotonic()   # the engine's latest step message (watchdog)
        self._stalled: str | None = None        # why the watchdog stopped the engine
        self.engine = EngineProcess(config, model_dir, device, self._on_engine_message)
        self._output_thread = threading.Thread(target=self._output_loop, name="textgen-output",
                                               daemon=True)
        self._output_thread.start()

    @property
    def limits(self):
        return self.engine.limits

    def submit(self, inputs: dict[str, np.ndarray], sink: ResponseSink) -> None:
        """Validates a request and queues its prompts (best_of sequences each); raises
        RequestError if it is refused."""
        arrival = time.monotonic()
        try:
            prompts = parse_prompts(inputs, self.engine.limits, self.config, self._encode_words,
                                    self._adapters.resolve, self._prefixes.resolve)
        except RequestError:
            self._request_metrics.refused(inputs, "validation")
            raise
        candidates = [self._candidate(p, i, arrival)
                      for p in prompts for i in range(p.params.best_of)]
        with self._lock:
            if self._engine_error is not None:
                self._request_metrics.refused(inputs, "generate")
                raise RequestError(f"the engine is not running: {self._engine_error}")
            if self._drain_deadline is not None:
                self._request_metrics.refused(inputs, "shutdown")
                raise RequestError("server is shutting down: no new requests are accepted")
            limit = self.config.max_concurrent_requests
            if self._num_active + len(candidates) > limit:
                self._request_metrics.refused(inputs, "conc_limit")
                raise RequestError(f"model is overloaded: {self._num_active} sequences in "
                                   f"flight, max_concurrent_requests is {limit}; retry later")
            if self._num_active == 0:  # the watchdog counts from the first work, not idleness
                self._last_step_at = arrival
            self._num_active += len(candidates)
            seq_ids = list(range(self._next_seq_id, self._next_seq_id + len(candidates)))
            self._next_seq_id += len(candidates)
        # Registered with the output thread before the engine can produce anything for them.
        self._results.put(("register", sink, candidates, seq_ids))
        seqs = []
        for seq_id, c in zip(seq_ids, candidates):
            params = c.prompt.params
            seqs.append(Sequence(seq_id, c.prompt.input_ids,
                                 dataclasses.replace(params.sampling, seed=c.seed),
                                 params.stopping, details=params.details,
                                 track_logprobs=params.details.per_token or params.best_of > 1,
                                 adapter=c.prompt.adapter, prefix=c.prompt.prefix,
                                 grammar=c.prompt.grammar))
        self._request_metrics.accepted(sink, prompts, seq_ids, arrival)
        self._send(("add", seqs))

    @staticmethod
    def _candidate(prompt: Prompt, index: int, arrival: float) -> Candidate:
        """The index-th of a prompt's best_of sequences: each samples with its own seed."""
        limit = prompt.params.stopping.time_limit_ms
        return Candidate(prompt, index, (prompt.params.sampling.seed + index) % 2**64,
                         None if limit is None else arrival + limit / 1000)

    def _encode_words(self, word: str) -> list[int]:
        return self.outputs.tokenizer(word, add_special_tokens=False)["input_ids"]

    def cancel(self, seq_id: int) -> None:
        """Cancels the request that owns seq_id (the detokenizer relays client cancellation)."""
        self._results.put(("cancel", seq_id))

    def num_active(self) -> int:
        with self._lock:
            return self._num_active

    def shutdown(self) -> None:
        """Fails what is in flight with an error response, then stops the engine process and
        the output thread."""
        self._send(("shutdown",))
        self.engine.join(timeout=60)   # its last outputs are queued by then
        self._results.put(("shutdown",))
        self._output_thread.join()
        self._publisher.close()

    # --- the engine process --------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        try:
            self.engine.send(command)
        except EngineProcessDied:
            pass  # the reader thread reports the death, failing what is in flight

    def _on_engine_message(self, message: tuple) -> None:
        """On the engine reader thread: step outputs go to the output thread, statistics to
        the metrics publisher (computed on its thread, from this snapshot)."""
        kind = message[0]
        if kind == "step":
            self._last_step_at = time.monotonic()
            _, outputs, last_step, stats, failure = message
            if outputs:
                self._results.put(("step", outputs))
            self._publisher.publish(self._engine_metrics.updates(last_step, stats, failure))
        elif kind == "failed":  # the process died: nothing in flight can finish
            reason = self._stalled or message[1]
            logger.error("[textgen] %s; failing the requests in flight", reason)
            with self._lock:
                self._engine_error = reason
            self._results.put(("engine_failed", reason))

    # --- output thread -------------------------------------------------------------------------

    def _output_loop(self) -> None:
        last_poll = 0.0
        while True:
            messages = self._drain(self._results, block=True, timeout=_CANCEL_POLL_SECONDS)
            step_outputs = []
            stopping = engine_failed = False
            for message in messages:
                kind = message[0]
                if kind == "register":
                    self.outputs.register(*message[1:])
                elif kind == "step":
                    step_outputs += message[1]
                elif kind == "cancel":
                    self._abort(self.outputs.seq_ids_of_request(message[1]), "cancelled")
                elif kind == "engine_failed":
                    step_outputs += [StepOutput(seq_id, [], "error", message[1])
                                     for seq_id in self.outputs.requests]
                    engine_failed = True
                else:
                    stopping = True
            if step_outputs:
                self._request_metrics.tokens_arrived(step_outputs)
                self._deliver(self.outputs.process(step_outputs))
            if engine_failed and self.config.exit_on_engine_failure:
                _stop_tritonserver()  # after the requests in flight got their errors
            if stopping:
                return
            if time.monotonic() - last_poll >= _CANCEL_POLL_SECONDS:
                # Coarse timer: text held for streams that got no token since (running streams
                # are flushed by process() at their next step), and cancelled clients.
                last_poll = time.monotonic()
                self._deliver(self.outputs.flush_due())
                for seq_ids in self.outputs.newly_cancelled():
                    self._abort(seq_ids, "cancelled")
                if self._drain_files is not None:
                    self._drain_step(last_poll)
                self._watch_engine(last_poll)

    def _watch_engine(self, now: float) -> None:
        """The watchdog: an engine that finished no step for engine_stall_timeout_s while
        requests are in flight is stopped; its death fails them and refuses new ones."""
        timeout = self.config.engine_stall_timeout_s
        if (not timeout or self._stalled or self._num_active == 0
                or now - self._last_step_at < timeout):
            return
        self._stalled = (f"the engine made no progress for {timeout:g}s with requests in "
                         f"flight (engine_stall_timeout_s) and was stopped")
        logger.error("[textgen] %s", self._stalled)
        self.engine.process.kill()

    def _deliver(self, result: ProcessResult) -> None:
        for sink, response, error, final in result.sends:
            try:
                sink.send(response, error, final)
            except Exception:  # a client that went away must not stop the others
                logger.exception("[textgen] sending a response failed")
        self._request_metrics.delivered(result.sends)
        if result.stop_seq_ids:
            self._abort(result.stop_seq_ids, "stop")
        finished = sum(len(state.sequences) for state in result.finished_requests)
        if finished:
            with self._lock:
                self._num_active -= finished

    def _drain_step(self, now: float) -> None:
        """Graceful shutdown, polled by the output thread: refuse new requests once a drain is
        requested, cancel what is still in flight at its deadline, report when none is left."""
        if self._drain_deadline is None:
            timeout = self._drain_files.requested_timeout()
            if timeout is None:
                return
            with self._lock:
                self._drain_deadline = now + timeout
            logger.info("[textgen] draining: %d sequences in flight, %.0fs to finish",
                        self.num_active(), timeout)
        if not self._drain_cancelled and now >= self._drain_deadline:
            self._drain_cancelled = True
            self._abort(list(self.outputs.requests), "cancelled")
        if self.num_active() == 0 and not self._drain_files.is_drained():
            logger.info("[textgen] drained")
            self._drain_files.mark_drained()

    def _abort(self, seq_ids: list[int], reason: str) -> None:
        if seq_ids:
            self._send(("abort", seq_ids, reason))

    @staticmethod
    def _drain(q: queue.Queue, block: bool, timeout: float | None = None) -> list:
        items = []
        try:
            items.append(q.get(block=block, timeout=timeout if block else None))
            while True:
                items.append(q.get_nowait())
        except queue.Empty:
            pass
        return items


def _stop_tritonserver() -> None:
    """Sends tritonserver (this stub's parent) SIGTERM: it stops answering ready, lets what is
    in flight finish and exits. A Python-backend model cannot turn Triton's readiness false
    otherwise (Triton 2.51 reports a model ready while its stub is dead)."""
    parent = os.getppid()
    try:
        name = Path(f"/proc/{parent}/comm").read_text().strip()
    except OSError:
        name = "?"
    if name != "tritonserver":
        logger.error("[textgen] the engine failed but this process's parent is %r, not "
                     "tritonserver: not stopping it", name)
        return
    logger.error("[textgen] the engine failed: stopping tritonserver so that it is restarted "
                 "(exit_on_engine_failure)")
    os.kill(parent, signal.SIGTERM)
