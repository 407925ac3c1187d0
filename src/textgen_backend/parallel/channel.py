"""Rank 0 -> workers: each call as pickled bytes in a shared-memory mailbox that the workers
poll, as vLLM's shared-memory broadcast does. Over gloo (torch.distributed's
broadcast_object_list: two TCP collectives) a call cost ~0.7 ms on the CPU machine; through
the mailbox it costs what pickling does (bench/RESULTS.md, section 16). A call larger than the
mailbox goes over gloo, announced in the mailbox so that the order holds.

Layout: [sequence number | payload length (-1: over gloo) | each reader's last sequence read |
payload]. The writer waits until every reader has read the previous call (in practice never:
rank 0 sends step N + 1 after step N's collectives, which every worker reached after reading
it), writes the payload, then the length, then the sequence number; a reader that sees a new
sequence number reads the payload. Fences order the stores and loads on any CPU.
"""
from __future__ import annotations

import pickle
import threading
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch.distributed as dist

_HEADER_WORDS = 2
CAPACITY = 4 << 20           # bytes of payload in the mailbox
_SPIN_SECONDS = 0.05         # a reader polls without sleeping this long after a call
_IDLE_SLEEP_SECONDS = 5e-4   # then sleeps this long between polls (an idle server)
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: acquiring and releasing a lock is one, on every architecture."""
    with _fence_lock:
        pass


class Mailbox:
    def __init__(self, shm: shared_memory.SharedMemory, readers: int):
        self.shm = shm
        self.readers = readers
        words = _HEADER_WORDS + readers
        self.header = np.ndarray((words,), dtype=np.int64, buffer=shm.buf)
        self.payload = shm.buf[8 * words:]

    @classmethod
    def create(cls, readers: int) -> Mailbox:
        size = 8 * (_HEADER_WORDS + readers) + CAPACITY
        box = cls(shared_memory.SharedMemory(create=True, size=size), readers)
        box.header[:] = 0
        return box

    @classmethod
    def attach(cls, name: str, readers: int) -> Mailbox:
        shm = shared_memory.SharedMemory(name=name)
        # the creator (rank 0) unlinks it; this process's tracker must not at exit
        resource_tracker.unregister(shm._name, "shared_memory")
        return cls(shm, readers)

    @property
    def name(self) -> str:
        return self.shm.name

    def send(self, message: object, group, readers_alive=lambda: True) -> None:
        """Rank 0: one call to every reader (over `group` when it does not fit). Waiting for a
        reader still on the previous call, it gives up once readers_alive() is false."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        sequence = int(self.header[0])
        while (self.header[_HEADER_WORDS:] != sequence).any():  # a reader is still reading
            if not readers_alive():
                raise RuntimeError("a reader of the mailbox is gone")
            time.sleep(0)
            _fence()
        fits = len(data) <= len(self.payload)
        if fits:
            self.payload[:len(data)] = data
        self.header[1] = len(data) if fits else -1
        _fence()
        self.header[0] = sequence + 1
        if not fits:
            dist.broadcast_object_list([message], src=0, group=group)

    def receive(self, reader: int, group) -> object:
        """Reader `reader` (0-based): waits for the next call."""
        sequence = int(self.header[_HEADER_WORDS + reader])
        started = time.monotonic()
        while True:
            _fence()
            if self.header[0] != sequence:
                break
            if time.monotonic() - started > _SPIN_SECONDS:
                time.sleep(_IDLE_SLEEP_SECONDS)
        length = int(self.header[1])
        if length >= 0:
            message = pickle.loads(self.payload[:length])
        else:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            message = box[0]
        _fence()
        self.header[_HEADER_WORDS + reader] = sequence + 1
        return message

    def close(self, unlink: bool) -> None:
        del self.header, self.payload
        self.shm.close()
        if unlink:
            self.shm.unlink()
