"""Loaded soft prompts on the device: an LRU bounded by --prompt-cache-size-mb (TGIS's
PROMPT_CACHE_SIZE_MB), filled on a worker thread so that the running batch never waits.

The scheduler asks `ready(ref)` before admitting a sequence with a prefix: a prompt not in the
cache is queued for loading and its sequences wait (others pass them). A sequence keeps its
prompt's tensor from admission to its end, so an eviction never takes it from under it. Only
real loads count in the metrics (a cache hit is not a load).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textgen_backend.prompt_tuning.store import PrefixRef, read_embeddings

logger = logging.getLogger("textgen")


@dataclass
class PromptCounters:
    loads: int = 0
    failures: int = 0
    load_seconds: list[float] = field(default_factory=list)  # not yet reported


class PromptCache:
    def __init__(self, capacity_bytes: int, dtype: torch.dtype, device: torch.device):
        self.capacity_bytes = capacity_bytes
        self.dtype, self.device = dtype, device
        self._cached: OrderedDict[str, torch.Tensor] = OrderedDict()   # LRU order
        self._loading: dict[str, tuple[PrefixRef, Future, float]] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="textgen-prompt-load")
        self.counters = PromptCounters()

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cached.values())

    def ready(self, ref: PrefixRef) -> bool:
        """Whether sequences with `ref` may be admitted now; if not, its load is started."""
        if ref.key in self._cached:
            return True
        if ref.key not in self._loading:
            self._loading[ref.key] = (ref, self._worker.submit(self._load, ref),
                                      time.monotonic())
        return False

    def take(self, ref: PrefixRef) -> torch.Tensor:
        """An admitted sequence's embeddings [num_virtual_tokens, hidden] (most recently used)."""
        self._cached.move_to_end(ref.key)
        return self._cached[ref.key]

    def poll(self) -> list[tuple[PrefixRef, str]]:
        """Between steps: finished loads enter the cache (evicting the least recently used past
        the capacity). Returns the prompts whose load failed, with the error."""
        failures = []
        for key, (ref, future, started) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            error = future.exception()
            if error is not None:
                self.counters.failures += 1
                logger.warning("[textgen] prefix %r failed to load: %s", ref.prefix_id, error)
                failures.append((ref, str(error)))
                continue
            seconds = time.monotonic() - started
            self.counters.loads += 1
            self.counters.load_seconds.append(seconds)
            self._cached[key] = future.result()
            # The newest stays even when it alone exceeds the capacity: its sequences need it.
            while self.size_bytes > self.capacity_bytes and len(self._cached) > 1:
                evicted, _ = self._cached.popitem(last=False)
                logger.info("[textgen] prefix %s evicted from the prompt cache", evicted)
        return failures

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _load(self, ref: PrefixRef) -> torch.Tensor:
        embeddings = read_embeddings(Path(ref.path))
        if tuple(embeddings.shape) != (ref.num_virtual_tokens, embeddings.shape[1]):
            raise ValueError(f"{ref.path} changed since it was checked: shape "
                             f"{list(embeddings.shape)}")
        return embeddings.to(self.device, self.dtype)
