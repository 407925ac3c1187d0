"""Every Prometheus metric textgen exports, and the thread that hands updates to Triton.

The set is TGIS's `tgi_*` table plus what users of Triton LLM backends ask for (time to first
token, inter-token latency, running/waiting gauges, KV-cache use, preemptions). The model.py
files register the families with Triton's custom-metrics API (`pb_utils.MetricFamily`) through
`TritonMetrics`. Each update is an IPC round trip to tritonserver (~15 us), so updates go through
a `MetricsPublisher` thread: the engine and output threads only put them on a queue.

An update is `(metric name, label values in the spec's order, value)`: a counter increment, a
gauge value or a histogram observation, by the metric's kind.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from textgen_backend.engine.stats import EngineStats, StepStats

logger = logging.getLogger("textgen")

Update = tuple[str, tuple[str, ...], float]

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   25.0, 50.0, 100.0)
TOKEN_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                         1.0, 2.5)
TOKEN_COUNT_BUCKETS = tuple(float(2 ** i) for i in range(18))   # 1 .. 131072
BATCH_SIZE_BUCKETS = tuple(float(2 ** i) for i in range(11))    # 1 .. 1024


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                            # "counter", "gauge" or "histogram"
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()      # histograms
    stat: str | None = None              # EngineStats attribute it reports, after every step
    observed: bool = True                # False: registered for TGIS dashboards, never updated


def _counter(name, description, labels=(), stat=None):
    return MetricSpec(name, "counter", description, tuple(labels), stat=stat)


def _gauge(name, description, stat):
    return MetricSpec(name, "gauge", description, stat=stat)


def _histogram(name, description, buckets, labels=()):
    return MetricSpec(name, "histogram", description, tuple(labels), tuple(buckets))


def _not_applicable(spec: MetricSpec, why: str) -> MetricSpec:
    return MetricSpec(spec.name, spec.kind, f"{spec.description} (never updated: {why})",
                      spec.labels, spec.buckets, observed=False)


_STEP_LABELS = ("method", "makeup")     # method: prefill or next_token; makeup: single_only

# Observed by request_metrics.RequestMetrics (the generation service's submit and output thread).
REQUEST_METRICS = (
    _counter("tgi_request_count", "Generate requests (a batch of n prompts counts as 1)",
             ["kind"]),
    _counter("tgi_request_input_count", "Prompts in generate requests (a batch of n counts as n)"),
    _counter("tgi_request_failure", "Failed requests, by error kind", ["err"]),
    _counter("tgi_request_success", "Sequences generated to their end, by finish reason",
             ["stop_reason", "kind"]),
    _histogram("tgi_request_max_new_tokens", "max_tokens of each prompt", TOKEN_COUNT_BUCKETS),
    _histogram("tgi_request_input_length", "Prompt length in tokens (accepted prompts)",
               TOKEN_COUNT_BUCKETS),
    _histogram("tgi_request_raw_input_length",
               "Prompt length in tokens, including prompts refused by validation",
               TOKEN_COUNT_BUCKETS),
    _histogram("tgi_request_validation_duration", "Request validation time (seconds)",
               SECONDS_BUCKETS),
    _histogram("tgi_request_queue_duration",
               "Time from validation to a sequence's first prefill (seconds)", SECONDS_BUCKETS),
    _histogram("tgi_request_inference_duration",
               "Time from a sequence's first prefill to its end (seconds)", SECONDS_BUCKETS),
    _histogram("tgi_request_mean_time_per_token_duration",
               "Inference time per generated token, per sequence (seconds)",
               TOKEN_SECONDS_BUCKETS),
    _histogram("tgi_request_generated_tokens", "Tokens generated per sequence",
               TOKEN_COUNT_BUCKETS),
    _histogram("tgi_request_total_tokens", "Prompt + generated tokens per sequence",
               TOKEN_COUNT_BUCKETS),
    _histogram("tgi_request_duration",
               "Time from the request's arrival at the generator to a sequence's end (seconds)",
               SECONDS_BUCKETS),
    _histogram("textgen_time_to_first_token_seconds",
               "Time from the request's arrival at the generator to a sequence's first token",
               SECONDS_BUCKETS),
    _counter("textgen_adapter_requests_total",
             "Prompts per LoRA adapter (adapter=\"\": the base model)", ["adapter"]),
    _counter("textgen_adapter_generated_tokens_total",
             "Tokens generated per LoRA adapter (adapter=\"\": the base model)", ["adapter"]),
    _histogram("textgen_inter_token_latency_seconds",
               "(last token time - first token time) / (tokens - 1), per sequence of 2+ tokens "
               "(genai-perf's inter_token_latency)", TOKEN_SECONDS_BUCKETS),
)

# Observed by EngineMetrics, from every engine step and the engine's statistics after it.
ENGINE_METRICS = (
    _counter("tgi_batch_inference_count", "Engine steps (model forward passes)", ["method"]),
    _counter("tgi_batch_inference_success", "Engine steps that succeeded", ["method"]),
    _counter("tgi_batch_inference_failure", "Engine steps that failed (reason: oom or error)",
             ["method", "reason"]),
    _counter("tgi_batch_concatenation_count",
             "Prefills that added sequences to a running batch"),
    _histogram("tgi_batch_inference_batch_size", "Sequences in each engine step",
               BATCH_SIZE_BUCKETS, ["method"]),
    _histogram("tgi_batch_inference_duration", "Time of each engine step (seconds)",
               SECONDS_BUCKETS, _STEP_LABELS),
    _histogram("tgi_batch_inference_forward_duration",
               "Time of each step's model run: inputs, forward, sampling (seconds)",
               SECONDS_BUCKETS, _STEP_LABELS),
    _histogram("tgi_batch_inference_tokproc_duration",
               "Time of each step's token bookkeeping after the forward (seconds; detokenizing "
               "runs on the output thread and is not included)", SECONDS_BUCKETS, _STEP_LABELS),
    _histogram("tgi_batch_next_tokens", "Prompt tokens in each prefill step", TOKEN_COUNT_BUCKETS),
    _gauge("tgi_batch_current_size", "Sequences in the running batch", "num_running"),
    _gauge("tgi_queue_size", "Sequences waiting to join the batch", "num_waiting"),
    _gauge("textgen_num_requests_running",
           "Sequences in the running batch (vLLM's name; same as tgi_batch_current_size)",
           "num_running"),
    _gauge("textgen_num_requests_waiting",
           "Sequences waiting to join the batch (vLLM's name; same as tgi_queue_size)",
           "num_waiting"),
    _gauge("tgi_batch_input_tokens", "Tokens (prompt + generated) of the running batch",
           "batch_tokens"),
    _gauge("tgi_batch_max_remaining_tokens",
           "Most tokens any sequence of the running batch may still generate",
           "batch_max_remaining_tokens"),
    _gauge("textgen_kv_cache_blocks_used", "KV-cache blocks held by sequences", "kv_blocks_used"),
    _gauge("textgen_kv_cache_blocks_total", "KV-cache blocks", "kv_blocks_total"),
    _gauge("textgen_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", "kv_cache_usage"),
    _counter("textgen_preemptions_total",
             "Sequences preempted (KV blocks freed, recomputed later)", stat="num_preemptions"),
    _counter("tgi_prefill_weight_limit_exceeded",
             "Prefills that left a waiting sequence out because max_batch_prefill_tokens was "
             "reached", stat="num_prefill_limit_hits"),
    _counter("textgen_prefix_cache_queries_total",
             "Prompt tokens looked up in the prefix cache (prefills of new and preempted "
             "sequences)", stat="prefix_cache_query_tokens"),
    _counter("textgen_prefix_cache_hits_total",
             "Prompt tokens found in the prefix cache (their KV reused, not computed)",
             stat="prefix_cache_hit_tokens"),
    _gauge("textgen_prefix_cache_blocks", "KV blocks registered in the prefix cache",
           "prefix_cache_blocks"),
    _counter("textgen_prefix_cache_evictions_total",
             "Cached KV blocks reused for other tokens (their prefix forgotten)",
             stat="prefix_cache_evictions"),
    _gauge("textgen_adapters_active", "LoRA adapters holding a device slot", "active_adapters"),
    _counter("textgen_adapter_loads_total", "LoRA adapters loaded into a slot",
             stat="adapter_loads"),
    _counter("textgen_adapter_evictions_total", "LoRA adapters evicted from their slot",
             stat="adapter_evictions"),
    _counter("textgen_adapter_load_failures_total", "LoRA adapter loads that failed",
             stat="adapter_load_failures"),
    _histogram("textgen_adapter_load_duration_seconds",
               "Time from an adapter's slot being reserved to its weights being in it",
               SECONDS_BUCKETS),
    _counter("textgen_speculation_draft_tokens_total",
             "Draft tokens verified (--speculate; method: ngram or medusa)", ["method"]),
    _counter("textgen_speculation_accepted_tokens_total",
             "Draft tokens equal to the token sampled in their place (kept)", ["method"]),
    _counter("textgen_speculation_verify_rows_total",
             "Sequence-steps that carried drafts (accepted / this = mean accepted length)",
             ["method"]),
    _not_applicable(_counter("tgi_queue_jump", "Queue jumps when filling a batch"),
                    "sequences join in arrival order"),
    _not_applicable(_counter("tgi_granular_batch_addition",
                             "Batch additions due to granular analysis"),
                    "admission counts KV blocks exactly"),
    _not_applicable(_counter("tgi_prefill_padding_limit_exceeded",
                             "Prefills stopped by the padding limit"),
                    "prefills are not padded"),
    _counter("tgi_prompt_load_failure", "Failed tuned soft-prompt loads (prefix_id)",
             stat="prompt_load_failures"),
    _histogram("tgi_prompt_load_duration",
               "Time to load a tuned soft prompt into the cache (seconds; a cache hit is not a "
               "load)", SECONDS_BUCKETS),
)

# Observed by the tokenizer model: every request it serves (each ensemble request and direct
# calls of its Tokenize API).
TOKENIZE_METRICS = (
    _counter("tgi_tokenize_request_count", "Tokenizer requests (a batch of n counts as 1)"),
    _counter("tgi_tokenize_request_input_count", "Texts tokenized (a batch of n counts as n)"),
    _histogram("tgi_tokenize_request_tokens", "Tokens per tokenizer request", TOKEN_COUNT_BUCKETS),
    _histogram("tgi_tokenize_request_duration", "Tokenizer request duration (seconds)",
               SECONDS_BUCKETS),
)

GENERATOR_METRICS = REQUEST_METRICS + ENGINE_METRICS


def tokenize_updates(num_texts: int, num_tokens: int, seconds: float) -> list[Update]:
    """What one tokenizer request reports (TGIS's tgi_tokenize_* set)."""
    return [("tgi_tokenize_request_count", (), 1),
            ("tgi_tokenize_request_input_count", (), num_texts),
            ("tgi_tokenize_request_tokens", (), num_tokens),
            ("tgi_tokenize_request_duration", (), seconds)]


class EngineMetrics:
    """Engine steps and statistics -> updates. Only the publisher's thread calls updates()."""

    def __init__(self):
        self._totals: dict[str, float] = {}   # cumulative EngineStats counters already reported

    def updates(self, step: StepStats | None, stats: EngineStats,
                failure: str | None = None) -> Iterator[Update]:
        """failure: "oom" or "error" when the step raised (its timings are then unset)."""
        if step is not None:
            method = "prefill" if step.is_prefill else "next_token"
            yield "tgi_batch_inference_count", (method,), 1
            if failure is not None:
                yield "tgi_batch_inference_failure", (method, failure), 1
            else:
                labels = (method, "single_only")   # TGIS's makeup label: no beam search
                yield "tgi_batch_inference_success", (method,), 1
                yield "tgi_batch_inference_batch_size", (method,), step.batch_size
                yield "tgi_batch_inference_duration", labels, step.total_seconds
                yield "tgi_batch_inference_forward_duration", labels, step.forward_seconds
                yield "tgi_batch_inference_tokproc_duration", labels, step.tokproc_seconds
                if step.is_prefill:
                    yield "tgi_batch_next_tokens", (), step.num_tokens
                    if step.joined_running_batch:
                        yield "tgi_batch_concatenation_count", (), 1
        for seconds in stats.adapter_load_seconds:
            yield "textgen_adapter_load_duration_seconds", (), seconds
        for seconds in stats.prompt_load_seconds:
            yield "tgi_prompt_load_duration", (), seconds
        if stats.speculation_method:
            for name, value in (("textgen_speculation_draft_tokens_total",
                                 stats.speculation_draft_tokens),
                                ("textgen_speculation_accepted_tokens_total",
                                 stats.speculation_accepted_tokens),
                                ("textgen_speculation_verify_rows_total",
                                 stats.speculation_verify_rows)):
                new, self._totals[name] = value - self._totals.get(name, 0), value
                yield name, (stats.speculation_method,), new
        for spec in ENGINE_METRICS:
            if spec.stat is None:
                continue
            value = getattr(stats, spec.stat)
            if spec.kind == "counter":
                value, self._totals[spec.name] = value - self._totals.get(spec.name, 0), value
            yield spec.name, (), value


class MetricsPublisher:
    """Applies updates to a sink on a thread of its own, in the order they were published."""

    def __init__(self, sink):
        self._sink = sink
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="textgen-metrics", daemon=True)
        self._thread.start()

    def publish(self, updates: Iterable[Update]) -> None:
        """Queues updates. A generator is only run on the publisher's thread, so a caller can
        hand over the work of computing them too."""
        self._queue.put(updates)

    def close(self) -> None:
        """Publishes what is queued, then stops the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (updates := self._queue.get()) is not None:
            try:
                for name, labels, value in updates:
                    self._sink.update(name, labels, value)
            except Exception:  # a metric must never take the server down
                logger.exception("[textgen] publishing metrics failed")


class TritonMetrics:
    """The sink over Triton's custom-metrics API. `pb_utils` is the model.py's
    triton_python_backend_utils module: this package never imports it."""

    def __init__(self, pb_utils, specs: Iterable[MetricSpec]):
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE,
                 "histogram": pb_utils.MetricFamily.HISTOGRAM}
        self._specs = {spec.name: spec for spec in specs}
        # A Metric is only usable while its MetricFamily is alive: both are kept here.
        self._families = {spec.name: pb_utils.MetricFamily(
            name=spec.name, description=spec.description, kind=kinds[spec.kind])
            for spec in self._specs.values()}
        self._metrics: dict[tuple[str, tuple[str, ...]], object] = {}
        self._gauges: dict[tuple[str, tuple[str, ...]], float] = {}   # skip IPC for unchanged
        for spec in self._specs.values():
            if not spec.labels:  # exported (as 0) from the start, not from the first update
                self._metric(spec, ())

    def update(self, name: str, labels: tuple[str, ...], value: float) -> None:
        spec = self._specs[name]
        key = (name, labels)
        metric = self._metrics.get(key) or self._metric(spec, labels)
        if spec.kind == "counter":
            if value:
                metric.increment(value)
        elif spec.kind == "gauge":
            if self._gauges.get(key) != value:
                metric.set(value)
                self._gauges[key] = value
        else:
            metric.observe(value)

    def _metric(self, spec: MetricSpec, labels: tuple[str, ...]):
        if len(labels) != len(spec.labels):
            raise ValueError(f"{spec.name} has labels {spec.labels}, got values {labels}")
        family = self._families[spec.name]
        label_map = dict(zip(spec.labels, labels))
        if spec.kind == "histogram":
            metric = family.Metric(labels=label_map, buckets=list(spec.buckets))
        else:
            metric = family.Metric(labels=label_map)
        self._metrics[(spec.name, labels)] = metric
        return metric
