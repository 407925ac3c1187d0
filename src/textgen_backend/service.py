"""The generation service behind the `generator` model: the engine on a background thread and
an output thread that turns its tokens into responses.

submit() only validates and enqueues; the engine thread runs steps back to back while there is
work; the output thread detokenizes, applies stop sequences, sends responses (one final
response per request, from there alone) and notices cancelled clients. Neither thread ever
waits for the other inside a step.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import numpy as np
import torch

from textgen_backend.config import EngineConfig
from textgen_backend.engine import Engine
from textgen_backend.metrics import EngineStats
from textgen_backend.output_processor import OutputProcessor, ProcessResult, ResponseSink
from textgen_backend.params import RequestError
from textgen_backend.request import parse_prompts
from textgen_backend.sequence import Sequence
from textgen_backend.tokenizer import load_tokenizer
from textgen_backend.weights import resolve_model_dir

logger = logging.getLogger("textgen")

_CANCEL_POLL_SECONDS = 0.05


class GenerationService:
    def __init__(self, config: EngineConfig, device: torch.device | None = None,
                 on_stats: Callable[[EngineStats], None] | None = None):
        """on_stats, if given, receives the engine's statistics after every step (engine thread)."""
        self.config = config
        self._on_stats = on_stats
        model_dir = resolve_model_dir(config.model_id, config.revision,
                                      config.huggingface_hub_cache)
        self.engine = Engine(config, model_dir, device)
        self.outputs = OutputProcessor(load_tokenizer(model_dir),
                                       config.stream_responses_per_second)
        self._commands: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._num_active = 0          # sequences submitted and not yet finished
        self._next_seq_id = 1
        self._engine_thread = threading.Thread(target=self._engine_loop, name="textgen-engine",
                                               daemon=True)
        self._output_thread = threading.Thread(target=self._output_loop, name="textgen-output",
                                               daemon=True)
        self._engine_thread.start()
        self._output_thread.start()

    @property
    def limits(self):
        return self.engine.limits

    def submit(self, inputs: dict[str, np.ndarray], sink: ResponseSink) -> None:
        """Validates a request and queues its prompts; raises RequestError if it is refused."""
        prompts = parse_prompts(inputs, self.engine.limits, self.config.max_stop_sequences)
        with self._lock:
            limit = self.config.max_concurrent_requests
            if self._num_active + len(prompts) > limit:
                raise RequestError(f"model is overloaded: {self._num_active} prompts in flight, "
                                   f"max_concurrent_requests is {limit}; retry later")
            self._num_active += len(prompts)
            seq_ids = list(range(self._next_seq_id, self._next_seq_id + len(prompts)))
            self._next_seq_id += len(prompts)
        # Registered with the output thread before the engine can produce anything for them.
        self._results.put(("register", sink, prompts, seq_ids))
        seqs = [Sequence(i, p.input_ids, p.params.sampling, p.params.stopping)
                for i, p in zip(seq_ids, prompts)]
        self._commands.put(("add", seqs))

    def cancel(self, seq_id: int) -> None:
        """Cancels the request that owns seq_id (the detokenizer relays client cancellation)."""
        self._results.put(("cancel", seq_id))

    def num_active(self) -> int:
        with self._lock:
            return self._num_active

    def shutdown(self) -> None:
        """Fails what is in flight with an error response, then stops both threads."""
        self._commands.put(("shutdown",))
        self._engine_thread.join()
        self._output_thread.join()

    # --- engine thread -------------------------------------------------------------------------

    def _engine_loop(self) -> None:
        while True:
            try:
                if not self._engine_iteration():
                    return
            except Exception:  # never let the engine thread die: the server would hang
                logger.exception("[textgen] engine loop error")
                self._results.put(("step", self.engine.fail_all("internal engine error")))

    def _engine_iteration(self) -> bool:
        """Applies queued commands, then runs one step if there is work; False on shutdown."""
        engine = self.engine
        for command in self._drain(self._commands, block=not engine.has_work()):
            if command[0] == "add":
                for seq in command[1]:
                    engine.add(seq)
            elif command[0] == "abort":
                for seq_id in command[1]:
                    engine.abort(seq_id, command[2])
            else:  # shutdown
                self._results.put(("step", engine.fail_all("server is shutting down")))
                self._results.put(("shutdown",))
                return False
        if not engine.has_work():
            return True
        try:
            outputs = engine.step()
        except Exception as exc:  # a failed step fails its sequences, not the server
            logger.exception("[textgen] engine step failed")
            outputs = engine.fail_all(f"generation failed: {exc}")
        if outputs:
            self._results.put(("step", outputs))
        if self._on_stats is not None:
            try:
                self._on_stats(engine.stats())
            except Exception:
                logger.exception("[textgen] reporting engine statistics failed")
        return True

    # --- output thread -------------------------------------------------------------------------

    def _output_loop(self) -> None:
        last_poll = 0.0
        while True:
            messages = self._drain(self._results, block=True, timeout=_CANCEL_POLL_SECONDS)
            step_outputs = []
            stopping = False
            for message in messages:
                kind = message[0]
                if kind == "register":
                    self.outputs.register(*message[1:])
                elif kind == "step":
                    step_outputs += message[1]
                elif kind == "cancel":
                    self._abort(self.outputs.seq_ids_of_request(message[1]), "cancelled")
                else:
                    stopping = True
            if step_outputs:
                self._deliver(self.outputs.process(step_outputs))
            if stopping:
                return
            if time.monotonic() - last_poll >= _CANCEL_POLL_SECONDS:
                # Coarse timer: text held for streams that got no token since (running streams
                # are flushed by process() at their next step), and cancelled clients.
                last_poll = time.monotonic()
                self._deliver(self.outputs.flush_due())
                for seq_ids in self.outputs.newly_cancelled():
                    self._abort(seq_ids, "cancelled")

    def _deliver(self, result: ProcessResult) -> None:
        for sink, response, error, final in result.sends:
            try:
                sink.send(response, error, final)
            except Exception:  # a client that went away must not stop the others
                logger.exception("[textgen] sending a response failed")
        if result.stop_seq_ids:
            self._abort(result.stop_seq_ids, "stop")
        finished = sum(len(state.sequences) for state in result.finished_requests)
        if finished:
            with self._lock:
                self._num_active -= finished

    def _abort(self, seq_ids: list[int], reason: str) -> None:
        if seq_ids:
            self._commands.put(("abort", seq_ids, reason))

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
