"""The tensor-parallel ranks: rank 0 is the engine process, every other rank a worker process
(`worker.py`) it starts. The scheduler runs once, on rank 0; each collective call of its model
runner (`collective`) is sent to the workers first, and every rank then runs the same call on
its shard, meeting the others in the model's all-reduces. Only rank 0 samples.

Calls travel as pickled objects through a shared-memory mailbox (`channel.py`; host data
only: a step's token ids and block tables, never activations); the model's collectives use
NCCL on GPUs, gloo on the CPU.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from textgen_backend.config import EngineConfig
from textgen_backend.parallel import MULTICAST_OFF
from textgen_backend.parallel.channel import Mailbox

logger = logging.getLogger("textgen")

# Workers wait for the next call for as long as the server is idle; a rank that dies is noticed
# by its process exiting (ShardGroup's watchers), not by a collective timing out.
_NO_TIMEOUT = timedelta(days=365)
# A worker's death reaches rank 0's collective (a reset connection) before its watcher's wait()
# returns: a call that fails waits this long for an exit to report as the cause.
_EXIT_GRACE_SECONDS = 5.0


def world_size(config: EngineConfig) -> int:
    """--num-shard, or with --sharded true and no --num-shard every visible GPU (TGI)."""
    if config.num_shard is not None:
        return config.num_shard
    if config.sharded:
        count = torch.cuda.device_count()
        if count < 2:
            raise ValueError(f"--sharded true needs two or more GPUs, {count} visible: set "
                             "--num-shard (on the CPU, shards are processes)")
        return count
    return 1


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU from rank 0's, or the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@dataclass(frozen=True)
class TensorParallel:
    """The model's collectives over all ranks (what a sharded layer calls)."""
    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, v] on each rank -> [n, world_size * v], rank 0's columns first."""
        out = x.new_empty(self.world_size, *x.shape)
        dist.all_gather(list(out.unbind(0)), x.contiguous())
        return out.permute(1, 0, 2).reshape(x.shape[0], -1)


def init_rank(rank: int, size: int, master_addr: str, master_port: int,
              device: torch.device) -> tuple[TensorParallel, object]:
    """Joins the process group; returns the model's collectives and the group calls go over.
    (NVLink multicast is already off: ShardGroup set it in rank 0's environment, which the
    workers inherit.)"""
    if device.type == "cuda":
        device = rank_device(device, 0)  # NCCL's device_id needs an index ("cuda" has none)
        torch.cuda.set_device(device)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=size, timeout=_NO_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    calls = (dist.new_group(backend="gloo", timeout=_NO_TIMEOUT) if device.type == "cuda"
             else dist.group.WORLD)
    return TensorParallel(rank, size), calls


def collective(method):
    """A model-runner method that every rank runs: rank 0's runner (the one with `shards`)
    sends the call to the workers, then runs it itself. If it raises there, the others are
    left in a collective rank 0 never joins: the group fails (no step-level recovery)."""
    @functools.wraps(method)
    def call(runner, *args):
        if runner.shards is None:
            return method(runner, *args)
        runner.shards.send(method.__name__, args)
        try:
            return method(runner, *args)
        except Exception as exc:
            runner.shards.call_failed(method.__name__, exc)
            raise
    return call


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _exit_engine(message: str) -> None:
    logger.error("[textgen] %s: stopping the engine", message)
    os._exit(1)


class ShardGroup:
    """Rank 0's side: starts the workers, joins them, sends them each collective call and
    watches them. A worker that exits, or a step that fails on rank 0 (the ranks are then out
    of step), calls `on_failure(message)`: by default the engine process exits, which fails the
    requests in flight; the engine process replaces it to report the cause first."""

    def __init__(self, config: EngineConfig, model_dir: Path, device: torch.device,
                 size: int, build_runner: str):
        """build_runner: "module:function" a worker calls to build its shard's model runner."""
        for key, value in MULTICAST_OFF.items():
            os.environ.setdefault(key, value)
        port = config.master_port or _free_port(config.master_addr)
        self.size = size
        self.on_failure = _exit_engine
        self._reporting = threading.Lock()  # one failure is reported: the process then exits
        self._closing = False
        self._mailbox = Mailbox.create(readers=size - 1)
        self.workers = [subprocess.Popen(
            [sys.executable, "-m", "textgen_backend.parallel.worker", "--rank", str(rank),
             "--world-size", str(size), "--master-addr", config.master_addr,
             "--master-port", str(port), "--device", str(rank_device(device, rank)),
             "--model-dir", str(model_dir), "--build-runner", build_runner,
             "--mailbox", self._mailbox.name, "--config", config.to_json()])
            for rank in range(1, size)]
        for rank, worker in enumerate(self.workers, start=1):
            threading.Thread(target=self._watch, args=(rank, worker), daemon=True,
                             name=f"textgen-shard-{rank}-watcher").start()
        self.tp, self._calls = init_rank(0, size, config.master_addr, port, device)
        logger.info("[textgen] tensor parallel: %d shards (%s), workers %s", size,
                    dist.get_backend(), [w.pid for w in self.workers])

    def _watch(self, rank: int, worker: subprocess.Popen) -> None:
        worker.wait()
        if not self._closing:
            self._report(self._exited(rank, worker))

    def call_failed(self, name: str, exc: Exception) -> None:
        """A collective call raised on rank 0: the cause is a worker's exit if one shows within
        the grace period, else the ranks are out of step."""
        raised = f"{name} failed on rank 0 ({type(exc).__name__}: {exc})"
        deadline = time.monotonic() + _EXIT_GRACE_SECONDS
        while time.monotonic() < deadline:
            for rank, worker in enumerate(self.workers, start=1):
                if worker.returncode is not None:  # set by its watcher's wait()
                    return self._report(f"{self._exited(rank, worker)}; {raised}")
            time.sleep(0.05)
        self._report(f"{raised}; the tensor-parallel ranks are out of step")

    def _exited(self, rank: int, worker: subprocess.Popen) -> str:
        return (f"tensor-parallel worker {rank} of {self.size} exited "
                f"(exit code {worker.returncode})")

    def _report(self, message: str) -> None:
        with self._reporting:
            self.on_failure(message)

    def send(self, name: str, args: tuple) -> None:
        self._mailbox.send((name, args), self._calls,
                           lambda: all(w.poll() is None for w in self.workers))

    def close(self) -> None:
        """Stops the workers (the engine's own exit stops them too: they watch their parent)."""
        self._closing = True
        try:
            self.send("stop", ())
        except RuntimeError:  # a worker is gone already
            pass
        for worker in self.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        self._mailbox.close(unlink=True)
        dist.destroy_process_group()
