"""The metric set, its Triton adapter (against a fake pb_utils), the engine's step updates and
the publisher thread."""
import threading

import pytest

from textgen_backend.engine.stats import EngineStats, StepStats
from textgen_backend.serving.metrics import (ENGINE_METRICS, GENERATOR_METRICS, TOKENIZE_METRICS,
                                             EngineMetrics, MetricsPublisher, TritonMetrics,
                                             tokenize_updates)

pytestmark = pytest.mark.unit


def test_every_tgis_metric_is_registered_once():
    names = [spec.name for spec in GENERATOR_METRICS + TOKENIZE_METRICS]
    assert len(names) == len(set(names))
    # The 37 metrics of TGIS's README table.
    tgis = {"tgi_request_count", "tgi_request_input_count", "tgi_request_failure",
            "tgi_request_success", "tgi_request_max_new_tokens", "tgi_request_input_length",
            "tgi_request_raw_input_length", "tgi_request_mean_time_per_token_duration",
            "tgi_request_validation_duration", "tgi_request_queue_duration",
            "tgi_request_generated_tokens", "tgi_request_total_tokens", "tgi_request_duration",
            "tgi_request_inference_duration", "tgi_batch_concatenation_count",
            "tgi_batch_inference_count", "tgi_batch_inference_success",
            "tgi_batch_inference_failure", "tgi_batch_inference_batch_size",
            "tgi_batch_inference_duration", "tgi_batch_inference_forward_duration",
            "tgi_batch_inference_tokproc_duration", "tgi_batch_next_tokens",
            "tgi_batch_current_size", "tgi_batch_input_tokens", "tgi_batch_max_remaining_tokens",
            "tgi_queue_size", "tgi_queue_jump", "tgi_granular_batch_addition",
            "tgi_prefill_weight_limit_exceeded", "tgi_prefill_padding_limit_exceeded",
            "tgi_prompt_load_failure", "tgi_prompt_load_duration", "tgi_tokenize_request_count",
            "tgi_tokenize_request_input_count", "tgi_tokenize_request_tokens",
            "tgi_tokenize_request_duration"}
    assert len(tgis) == 37 and tgis <= set(names)
    labels = {spec.name: spec.labels for spec in GENERATOR_METRICS}
    assert labels["tgi_request_success"] == ("stop_reason", "kind")
    assert labels["tgi_batch_inference_failure"] == ("method", "reason")
    assert labels["tgi_batch_inference_duration"] == ("method", "makeup")


class FakeMetric:
    def __init__(self, labels, buckets):
        self.labels, self.buckets, self.calls = labels, buckets, []

    def increment(self, value):
        self.calls.append(("increment", value))

    def set(self, value):
        self.calls.append(("set", value))

    def observe(self, value):
        self.calls.append(("observe", value))


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"
    created: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        FakeFamily.created[name] = self

    def Metric(self, labels, buckets=None):
        if (self.kind == "HISTOGRAM") != (buckets is not None):
            raise ValueError("buckets are required for histograms, and only for them")
        self.metrics.append(FakeMetric(labels, buckets))
        return self.metrics[-1]


class FakePbUtils:
    MetricFamily = FakeFamily


def test_triton_metrics_maps_updates_onto_families():
    FakeFamily.created = {}
    sink = TritonMetrics(FakePbUtils, GENERATOR_METRICS)
    families = FakeFamily.created
    assert set(families) == {spec.name for spec in GENERATOR_METRICS}
    assert families["tgi_request_duration"].kind == "HISTOGRAM"
    # Label-less series exist from the start; labelled ones from their first update.
    assert len(families["tgi_request_input_count"].metrics) == 1
    assert families["tgi_prompt_load_duration"].metrics[0].buckets[0] == 0.001
    assert families["tgi_request_count"].metrics == []

    sink.update("tgi_request_count", ("stream",), 1)
    sink.update("tgi_request_count", ("stream",), 1)
    sink.update("tgi_request_count", ("single",), 1)
    sink.update("tgi_request_count", ("single",), 0)       # no IPC for a zero increment
    by_kind = {m.labels["kind"]: m.calls for m in families["tgi_request_count"].metrics}
    assert by_kind == {"stream": [("increment", 1), ("increment", 1)],
                       "single": [("increment", 1)]}

    for value in (3, 3, 4):                                  # no IPC for an unchanged gauge
        sink.update("tgi_queue_size", (), value)
    assert families["tgi_queue_size"].metrics[0].calls == [("set", 3), ("set", 4)]

    sink.update("tgi_batch_inference_duration", ("prefill", "single_only"), 0.25)
    metric = families["tgi_batch_inference_duration"].metrics[0]
    assert metric.labels == {"method": "prefill", "makeup": "single_only"}
    assert metric.calls == [("observe", 0.25)]
    with pytest.raises(ValueError, match="has labels"):
        sink.update("tgi_request_failure", (), 1)


def test_engine_metrics_for_steps_and_statistics():
    def stats(**changes):
        values = dict(num_running=2, num_waiting=1, batch_tokens=40,
                      batch_max_remaining_tokens=7, kv_blocks_used=3, kv_blocks_total=12,
                      num_preemptions=0, num_prefill_limit_hits=0)
        return EngineStats(**{**values, **changes})

    metrics = EngineMetrics()
    prefill = StepStats(True, 2, 37, True, forward_seconds=0.5, tokproc_seconds=0.01,
                        total_seconds=0.6)
    updates = list(metrics.updates(prefill, stats(num_preemptions=2)))
    step = {(name, labels): value for name, labels, value in updates}
    assert step[("tgi_batch_inference_count", ("prefill",))] == 1
    assert step[("tgi_batch_inference_success", ("prefill",))] == 1
    assert step[("tgi_batch_inference_batch_size", ("prefill",))] == 2
    assert step[("tgi_batch_inference_duration", ("prefill", "single_only"))] == 0.6
    assert step[("tgi_batch_inference_forward_duration", ("prefill", "single_only"))] == 0.5
    assert step[("tgi_batch_inference_tokproc_duration", ("prefill", "single_only"))] == 0.01
    assert step[("tgi_batch_next_tokens", ())] == 37
    assert step[("tgi_batch_concatenation_count", ())] == 1
    assert step[("tgi_batch_current_size", ())] == 2 == step[("textgen_num_requests_running", ())]
    assert step[("tgi_queue_size", ())] == 1 == step[("textgen_num_requests_waiting", ())]
    assert step[("tgi_batch_input_tokens", ())] == 40
    assert step[("tgi_batch_max_remaining_tokens", ())] == 7
    assert step[("textgen_kv_cache_usage_ratio", ())] == 0.25
    assert step[("textgen_preemptions_total", ())] == 2

    # Cumulative engine counters become increments; a decode step has no prefill metrics.
    decode = StepStats(False, 2, 2, False, 0.1, 0.01, 0.12)
    step = {(n, l): v for n, l, v in metrics.updates(decode, stats(num_preemptions=5,
                                                                   num_prefill_limit_hits=1))}
    assert step[("textgen_preemptions_total", ())] == 3
    assert step[("tgi_prefill_weight_limit_exceeded", ())] == 1
    assert ("tgi_batch_next_tokens", ()) not in step
    assert step[("tgi_batch_inference_count", ("next_token",))] == 1

    failed = {(n, l): v for n, l, v in metrics.updates(StepStats(False, 2, 2, False), stats(),
                                                        failure="oom")}
    assert failed[("tgi_batch_inference_failure", ("next_token", "oom"))] == 1
    assert ("tgi_batch_inference_success", ("next_token",)) not in failed
    idle = [name for name, _, _ in metrics.updates(None, stats())]
    assert idle == [spec.name for spec in ENGINE_METRICS if spec.stat]


def test_tokenize_updates():
    assert tokenize_updates(3, 17, 0.5) == [
        ("tgi_tokenize_request_count", (), 1), ("tgi_tokenize_request_input_count", (), 3),
        ("tgi_tokenize_request_tokens", (), 17), ("tgi_tokenize_request_duration", (), 0.5)]


class RecordingSink:
    def __init__(self):
        self.updates, self.threads = [], set()

    def update(self, name, labels, value):
        if name == "boom":
            raise RuntimeError("a failing sink")
        self.threads.add(threading.current_thread().name)
        self.updates.append((name, labels, value))


def test_publisher_applies_in_order_on_its_own_thread_and_survives_errors():
    sink = RecordingSink()
    publisher = MetricsPublisher(sink)
    ran_on = []

    def lazy():
        ran_on.append(threading.current_thread().name)
        yield "b", (), 2

    publisher.publish([("a", (), 1)])
    publisher.publish(lazy())
    publisher.publish([("boom", (), 1)])
    publisher.publish([("c", (), 3)])
    publisher.close()
    assert sink.updates == [("a", (), 1), ("b", (), 2), ("c", (), 3)]
    assert ran_on == ["textgen-metrics"] and sink.threads == {"textgen-metrics"}
