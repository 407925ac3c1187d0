"""The engine in a process of its own (vLLM V1's "engine core"), driven over a pipe.

Why a process: in the generator's process, Triton's request and response threads, the output
thread and the metrics thread share one GIL with the engine loop. Each eager kernel launch and
each step's host work waited for it: served prefills ran at half their in-process speed, decode
steps ~1 ms slower, and the engine sat idle between steps (bench/RESULTS.md, section 8). Here
the loop owns its interpreter: it applies commands, runs a step, sends the step's outputs and
statistics back, and never waits for the response path.

Parent -> child: ("add", [Sequence]), ("abort", [seq_id], reason), ("shutdown",).
Child -> parent: ("ready", EngineLimits) or ("failed", message) once, then
("step", [StepOutput], StepStats | None, EngineStats, failure) per step, and ("shutdown",) last.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

from textgen_backend.config import EngineConfig, EngineLimits

logger = logging.getLogger("textgen")

_PARENT_CHECK_SECONDS = 1.0
_IDLE_STEP_SECONDS = 0.001


class EngineProcessDied(RuntimeError):
    pass


def _python_executable() -> str:
    """The interpreter for the child: inside Triton's Python-backend stub sys.executable names
    the stub, so take the environment's own python."""
    candidate = Path(sys.prefix) / "bin" / "python3"
    return str(candidate) if candidate.exists() else sys.executable


class EngineProcess:
    """Parent side: starts the child, sends it commands (from any thread), and hands every
    message it sends back to `on_message` on a reader thread of its own."""

    def __init__(self, config: EngineConfig, model_dir: Path, device: str | None, on_message):
        ctx = multiprocessing.get_context("spawn")
        ctx.set_executable(_python_executable())
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._send_lock = threading.Lock()
        self.process = ctx.Process(target=_child_main, name="textgen-engine",
                                   args=(config.to_json(), str(model_dir), device, child_conn),
                                   daemon=True)
        self.process.start()
        child_conn.close()
        first = self._recv()
        if first[0] == "failed":
            self.process.join(timeout=30)
            raise RuntimeError(first[1])
        self.limits: EngineLimits = first[1]
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read_loop, name="textgen-engine-reader",
                                        daemon=True)
        self._reader.start()

    def send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError) as exc:  # the child is gone; the reader reports it
                raise EngineProcessDied(f"the engine process is gone: {exc}") from None

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            code = self.process.exitcode
            return ("failed", f"the engine process exited (exit code {code})")

    def _read_loop(self) -> None:
        while True:
            message = self._recv()
            self._on_message(message)
            if message[0] in ("shutdown", "failed"):
                return


# --- the child ------------------------------------------------------------------------------


def _child_main(config_json: str, model_dir: str, device: str | None, conn) -> None:
    # A Ctrl-C or a group-wide SIGTERM reaches this process too; shutting down is the parent's
    # call (it drains, then sends "shutdown"), and its death ends this loop anyway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from textgen_backend.logs import configure_logging
    from textgen_backend.engine.engine import Engine

    config = EngineConfig.from_json(config_json)
    configure_logging(config.json_output)
    try:
        engine = Engine(config, Path(model_dir), torch.device(device) if device else None)
    except Exception as exc:  # the parent fails the model load with this message
        logger.exception("[textgen] the engine failed to start")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.limits))
    loop = _EngineLoop(engine, conn)
    if engine.shards is not None:
        engine.shards.on_failure = loop.fail_and_exit
    loop.run()


class _EngineLoop:
    def __init__(self, engine, conn):
        self.engine = engine
        self.conn = conn
        self.parent = os.getppid()
        self._send_lock = threading.Lock()  # the loop's sends, and fail_and_exit's

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    def fail_and_exit(self, message: str) -> None:
        """A tensor-parallel rank failed (called from its watcher thread while the loop may be
        stuck in a collective): the parent fails the requests in flight with the cause."""
        logger.error("[textgen] %s: the engine stops", message)
        try:
            self.send(("failed", f"the engine failed: {message}"))
        finally:
            os._exit(1)

    def run(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except (EOFError, OSError, BrokenPipeError):
                return  # the parent is gone: nothing to serve
            except Exception:  # never leave the loop for an engine error: the server would hang
                logger.exception("[textgen] engine loop error")
                self.send(("step", self.engine.fail_all("internal engine error"), None,
                           self.engine.stats(), "error"))
                time.sleep(0.1)  # an error that repeats must not spin the loop

    def _commands(self) -> list:
        """Queued commands; waits for one while there is no work (checking that the parent
        still lives: a killed server must not leave its engine holding the GPU)."""
        commands = []
        while not commands and not self.engine.has_work():
            if self.conn.poll(_PARENT_CHECK_SECONDS):
                break
            if os.getppid() != self.parent:
                raise EOFError("parent exited")
        while self.conn.poll():
            commands.append(self.conn.recv())
        return commands

    def _iteration(self) -> bool:
        engine = self.engine
        for command in self._commands():
            if command[0] == "add":
                for seq in command[1]:
                    engine.add(seq)
            elif command[0] == "abort":
                for seq_id in command[1]:
                    engine.abort(seq_id, command[2])
            else:  # shutdown
                self.send(("step", engine.fail_all("server is shutting down"), None,
                           engine.stats(), None))
                engine.close()
                self.send(("shutdown",))
                return False
        if not engine.has_work():
            return True
        failure = None
        try:
            outputs = engine.step()
        except Exception as exc:  # a failed step fails its sequences, not the server
            logger.exception("[textgen] engine step failed")
            import torch

            failure = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
            outputs = engine.fail_all(f"generation failed: {exc}")
        if not outputs and engine.last_step is None:
            time.sleep(_IDLE_STEP_SECONDS)  # the waiting sequences' adapters are loading
            return True
        if failure is None and engine.last_step is not None:
            failure = engine.last_step.failure  # a step the engine recovered from
        self.send(("step", outputs, engine.last_step, engine.stats(), failure))
        return True

