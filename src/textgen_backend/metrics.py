"""Engine statistics and the Prometheus metrics they feed (Triton-free: the generator's
model.py registers these families with Triton's custom-metrics API and updates them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int          # since start

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                     # "gauge" or "counter"
    description: str
    stat: str                     # EngineStats attribute it reports


ENGINE_METRICS = (
    MetricSpec("tgi_batch_current_size", "gauge", "Sequences in the running batch", "num_running"),
    MetricSpec("tgi_queue_size", "gauge", "Sequences waiting to join the batch", "num_waiting"),
    MetricSpec("textgen_kv_cache_blocks_used", "gauge", "KV-cache blocks held by sequences",
               "kv_blocks_used"),
    MetricSpec("textgen_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use",
               "kv_cache_usage"),
    MetricSpec("textgen_preemptions_total", "counter",
               "Sequences preempted (KV blocks freed, recomputed later)", "num_preemptions"),
)
