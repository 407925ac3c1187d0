"""Which adapters hold a device slot (LoRAX's active set): loading on a worker thread so that
the batch never waits, LRU eviction of idle adapters, and cycling when more adapters wait than
fit.

The scheduler asks `ready(ref)` before admitting a sequence: an adapter that is not resident is
queued for loading and its sequences wait (others pass them). A resident adapter holds its slot
while any of its sequences runs (`acquire` / `release`). When slots are full and an adapter
waits, an idle one (no running sequence) is evicted, least recently used first; if none is
idle, every `cycle_seconds` the longest-resident adapter yields: it admits no new sequence, and
once its running ones finish its slot goes to the adapter waiting longest. An adapter counts as
idle only when no waiting sequence asked for it since the last poll. Adapters preloaded
with --adapter-id never yield or leave.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.adapters.peft_format import AdapterWeights
from textgen_backend.adapters.shard_loads import ShardedAdapterLoads
from textgen_backend.adapters.slots import AdapterSlots

logger = logging.getLogger("textgen")


@dataclass
class _Resident:
    ref: AdapterRef
    slot: int
    pinned: bool
    since: float               # when it became resident: the longest-resident yields first
    last_used: float
    running: int = 0
    yielding: bool = False
    asked: bool = True         # ready() was asked since the last poll: sequences wait for it


@dataclass
class _Loading:
    ref: AdapterRef
    slot: int
    future: Future
    started: float


@dataclass
class AdapterCounters:
    loads: int = 0
    evictions: int = 0
    failures: int = 0
    load_seconds: list[float] = field(default_factory=list)  # not yet reported


class AdapterResidency:
    def __init__(self, slots: AdapterSlots, load: Callable[[AdapterRef], AdapterWeights],
                 cycle_seconds: float, clock: Callable[[], float] = time.monotonic,
                 shard_loads: ShardedAdapterLoads | None = None):
        """shard_loads: tensor-parallel workers load each adapter beside this rank."""
        self.slots = slots
        self._shard_loads = shard_loads
        self._load = load
        self._cycle_seconds = cycle_seconds
        self._clock = clock
        self._free = list(range(slots.num_slots - 1, -1, -1))
        self._resident: dict[str, _Resident] = {}
        self._loading: dict[str, _Loading] = {}
        self._wanted: OrderedDict[str, AdapterRef] = OrderedDict()  # waiting for a slot
        self._last_cycle = clock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="textgen-adapter-load")
        self.counters = AdapterCounters()

    @property
    def num_active(self) -> int:
        return len(self._resident)

    def preload(self, ref: AdapterRef) -> None:
        """Loads an adapter now, for good (--adapter-id)."""
        if ref.key in self._resident:
            return
        if len(self._free) < 2:  # preloaded adapters never leave: requests naming any other
            # adapter would wait for a slot forever
            raise ValueError(f"--adapter-id names too many adapters for the "
                             f"{self.slots.num_slots} adapter slots: at most "
                             f"{self.slots.num_slots - 1}, so that one slot stays for adapters "
                             "loaded on demand (raise --max-active-adapters or "
                             "--adapter-memory-fraction)")
        slot = self._free.pop()
        self._load_into(ref, slot, self._begin_on_shards(ref, slot))
        now = self._clock()
        self._resident[ref.key] = _Resident(ref, slot, True, now, now)

    def ready(self, ref: AdapterRef) -> bool:
        """Whether sequences of `ref` may be admitted now; if not, it is queued for a slot."""
        resident = self._resident.get(ref.key)
        if resident is not None:
            resident.asked = True
        if resident is not None and not resident.yielding:
            return True
        if ref.key not in self._loading:
            self._wanted.setdefault(ref.key, ref)
        return False

    def acquire(self, ref: AdapterRef) -> int:
        """A sequence of `ref` is admitted: returns its slot, held until release."""
        resident = self._resident[ref.key]
        resident.running += 1
        resident.last_used = self._clock()
        return resident.slot

    def release(self, ref: AdapterRef) -> None:
        resident = self._resident[ref.key]
        resident.running -= 1
        resident.last_used = self._clock()

    def poll(self) -> list[tuple[AdapterRef, str]]:
        """Between steps: finished loads become resident, slots go to waiting adapters, and
        cycling. Returns the adapters whose load failed, with the error."""
        now = self._clock()
        failures = self._finish_loads(now)
        for key in [k for k, r in self._resident.items() if r.yielding and r.running == 0]:
            self._evict(key)
        for key, ref in list(self._wanted.items()):
            resident = self._resident.get(key)
            if resident is not None:
                if not resident.yielding:
                    del self._wanted[key]
                continue
            slot = self._free.pop() if self._free else self._evict_idle()
            if slot is None:
                break
            del self._wanted[key]
            future = self._worker.submit(self._load_into, ref, slot,
                                         self._begin_on_shards(ref, slot))
            self._loading[key] = _Loading(ref, slot, future, now)
        self._cycle(now)
        for resident in self._resident.values():
            resident.asked = False
        return failures

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # --- internals ---------------------------------------------------------------------------

    def _begin_on_shards(self, ref: AdapterRef, slot: int) -> int | None:
        return self._shard_loads.begin(ref, slot) if self._shard_loads is not None else None

    def _load_into(self, ref: AdapterRef, slot: int, shard_load: int | None) -> None:
        """Reads an adapter and writes it into its reserved slot (on the loader thread: the
        running batch never waits for it), then waits for the other shards' writes."""
        self.slots.write(slot, self._load(ref))
        if shard_load is not None:
            self._shard_loads.wait(shard_load)

    def _finish_loads(self, now: float) -> list[tuple[AdapterRef, str]]:
        failures = []
        for key, loading in list(self._loading.items()):
            if not loading.future.done():
                continue
            del self._loading[key]
            error = loading.future.exception()
            if error is not None:
                self._free.append(loading.slot)
                self.counters.failures += 1
                logger.warning("[textgen] adapter %r failed to load: %s", loading.ref.name, error)
                failures.append((loading.ref, str(error)))
                continue
            self._resident[key] = _Resident(loading.ref, loading.slot, False, now, now)
            self.counters.loads += 1
            self.counters.load_seconds.append(now - loading.started)
            logger.info("[textgen] adapter %r loaded into slot %d in %.3fs", loading.ref.name,
                        loading.slot, now - loading.started)
        return failures

    def _evict_idle(self) -> int | None:
        # idle: nothing running, and no waiting sequence asked for it since the last poll (a
        # freshly loaded adapter waits for its first admission)
        idle = [r for r in self._resident.values()
                if r.running == 0 and not r.pinned and not r.asked]
        if not idle:
            return None
        victim = min(idle, key=lambda r: r.last_used)
        self._evict(victim.ref.key)
        return self._free.pop()

    def _evict(self, key: str) -> None:
        resident = self._resident.pop(key)
        self._free.append(resident.slot)
        self.counters.evictions += 1
        logger.info("[textgen] adapter %r evicted from slot %d", resident.ref.name, resident.slot)

    def _cycle(self, now: float) -> None:
        if not self._wanted or self._free:
            self._last_cycle = now
            return
        if now - self._last_cycle < self._cycle_seconds:
            return
        self._last_cycle = now
        candidates = [r for r in self._resident.values() if not r.pinned and not r.yielding]
        if candidates:
            oldest = min(candidates, key=lambda r: r.since)
            oldest.yielding = True
            logger.info("[textgen] adapter %r yields its slot to waiting adapters",
                        oldest.ref.name)
