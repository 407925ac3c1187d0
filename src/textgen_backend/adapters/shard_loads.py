"""Adapter loads on every tensor-parallel rank. Rank 0's residency decides which adapter goes
into which slot and loads it on its loader thread; each worker loads the same adapter into the
same slot (its share of the weights: slots.py) on a loader thread of its own, started by a call
rank 0 sends between steps. Rank 0's load completes only once every worker has reported
through the process group's key-value store, so no sequence uses a slot before every rank
wrote it, and no step waits for a load."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import torch.distributed as dist

from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.adapters.peft_format import AdapterWeights
from textgen_backend.adapters.slots import AdapterSlots

if TYPE_CHECKING:
    from textgen_backend.parallel.group import ShardGroup


def _key(load_id: int, rank: int) -> str:
    return f"textgen/adapter-load/{load_id}/{rank}"


def _store():
    return dist.distributed_c10d._get_default_store()  # the rendezvous's, shared by all ranks


class ShardedAdapterLoads:
    """Rank 0's side."""

    def __init__(self, shards: ShardGroup):
        self._shards = shards
        self._store = _store()
        self._next_id = 0

    def begin(self, ref: AdapterRef, slot: int) -> int:
        """On the engine thread, between steps: the workers start loading `ref` into `slot`."""
        self._next_id += 1
        self._shards.send("load_adapter", (self._next_id, ref, slot))
        return self._next_id

    def wait(self, load_id: int) -> None:
        """On rank 0's loader thread: until every worker wrote its share; raises their errors."""
        errors = []
        for rank in range(1, self._shards.size):
            key = _key(load_id, rank)
            error = self._store.get(key).decode()
            self._store.delete_key(key)
            if error:
                errors.append(f"shard {rank}: {error}")
        if errors:
            raise RuntimeError("; ".join(errors))


class WorkerAdapterLoads:
    """A worker's side: loads what rank 0 loads, reports done (or the error) in the store."""

    def __init__(self, slots: AdapterSlots, load: Callable[[AdapterRef], AdapterWeights],
                 rank: int):
        self._slots, self._load, self._rank = slots, load, rank
        self._store = _store()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="textgen-adapter-load")

    def start(self, load_id: int, ref: AdapterRef, slot: int) -> None:
        self._thread.submit(self._run, load_id, ref, slot)

    def _run(self, load_id: int, ref: AdapterRef, slot: int) -> None:
        try:
            self._slots.write(slot, self._load(ref))
            error = ""
        except Exception as exc:  # noqa: BLE001 - rank 0 fails the adapter's requests with it
            error = f"{type(exc).__name__}: {exc}"
        self._store.set(_key(load_id, self._rank), error)
