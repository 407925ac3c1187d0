"""RequestMetrics against scripted traffic with a controlled clock: exact counters and values."""
from types import SimpleNamespace

import numpy as np
import pytest

from textgen_backend.serving import request_metrics
from textgen_backend.serving.request_metrics import RequestMetrics, request_kind

pytestmark = pytest.mark.unit


class ListPublisher:
    def __init__(self):
        self.updates = []

    def publish(self, updates):
        self.updates += list(updates)

    def values(self, name, labels=()):
        return [v for n, l, v in self.updates if n == name and l == labels]


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(request_metrics.time, "monotonic", lambda: now[0])
    return now


def prompt(n_tokens, max_tokens=10, stream=False, adapter=None):
    return SimpleNamespace(input_ids=list(range(n_tokens)),
                           params=SimpleNamespace(stream=stream,
                                                  stopping=SimpleNamespace(max_tokens=max_tokens)),
                           adapter=adapter and SimpleNamespace(name=adapter))


def response(seq_id, finish_reason="", generated=0, n_input=4, batch_index=0):
    return SimpleNamespace(sequence_id=seq_id, finish_reason=finish_reason,
                           num_output_tokens=generated, num_input_tokens=n_input,
                           batch_index=batch_index)


def tokens(*seq_ids, scheduled_at=None):
    return [SimpleNamespace(seq_id=i, new_token_ids=[7], scheduled_at=scheduled_at)
            for i in seq_ids]


def test_request_kind():
    assert [request_kind(1, False), request_kind(3, False), request_kind(1, True),
            request_kind(2, True)] == ["single", "batch", "stream", "stream"]


def test_a_streamed_request_from_arrival_to_its_end(clock):
    publisher = ListPublisher()
    metrics = RequestMetrics(publisher)
    sink = object()
    received = clock[0]
    clock[0] += 0.002                                    # validation
    metrics.accepted(sink, [prompt(4, max_tokens=3, stream=True)], [5], received)
    clock[0] = 100.050
    metrics.tokens_arrived(tokens(5, scheduled_at=100.010))  # the first token, prefilled then
    clock[0] = 100.060
    metrics.tokens_arrived(tokens(5))
    metrics.delivered([(sink, response(5, "", 2), None, False)])
    clock[0] = 100.090
    metrics.tokens_arrived(tokens(5))
    metrics.delivered([(sink, response(5, "length", 3), None, True)])

    assert publisher.values("tgi_request_count", ("stream",)) == [1]
    assert publisher.values("tgi_request_input_count") == [1]
    assert publisher.values("tgi_request_raw_input_length") == [4]
    assert publisher.values("tgi_request_input_length") == [4]
    assert publisher.values("tgi_request_max_new_tokens") == [3]
    assert publisher.values("tgi_request_validation_duration") == pytest.approx([0.002])
    assert publisher.values("tgi_request_success", ("length", "stream")) == [1]
    assert publisher.values("tgi_request_queue_duration") == pytest.approx([0.008])
    assert publisher.values("tgi_request_inference_duration") == pytest.approx([0.080])
    assert publisher.values("tgi_request_mean_time_per_token_duration") == pytest.approx(
        [0.080 / 3])
    assert publisher.values("textgen_time_to_first_token_seconds") == pytest.approx([0.050])
    assert publisher.values("textgen_inter_token_latency_seconds") == pytest.approx([0.020])
    assert publisher.values("tgi_request_duration") == pytest.approx([0.090])
    assert publisher.values("tgi_request_generated_tokens") == [3]
    assert publisher.values("tgi_request_total_tokens") == [7]
    assert not [u for u in publisher.updates if u[0] == "tgi_request_failure"]


def test_batch_with_one_sequence_done_then_an_error(clock):
    publisher = ListPublisher()
    metrics = RequestMetrics(publisher)
    sink = object()
    metrics.accepted(sink, [prompt(3), prompt(5)], [1, 2], clock[0])
    metrics.tokens_arrived(tokens(1, 2, scheduled_at=100.0))
    metrics.delivered([(sink, response(1, "eos_token", 1), None, False)])
    metrics.delivered([(sink, None, "generation failed: boom", True)])
    assert publisher.values("tgi_request_count", ("batch",)) == [1]
    assert publisher.values("tgi_request_input_count") == [2]
    assert publisher.values("tgi_request_success", ("eos_token", "batch")) == [1]
    assert publisher.values("tgi_request_failure", ("generate",)) == [1]
    assert publisher.values("tgi_request_generated_tokens") == [1]
    assert publisher.values("textgen_inter_token_latency_seconds") == []  # needs 2 tokens
    # The request is forgotten at its final response: later news for it is ignored.
    metrics.delivered([(sink, response(2, "length", 4), None, True)])
    assert publisher.values("tgi_request_success", ("length", "batch")) == []


def test_cancelled_and_refused_requests_count_as_failures(clock):
    publisher = ListPublisher()
    metrics = RequestMetrics(publisher)
    sink = object()
    metrics.accepted(sink, [prompt(2, stream=True)], [9],
                     clock[0])
    metrics.delivered([(sink, response(9, "cancelled", 0), None, True)])
    metrics.refused({"_input_lengths": np.array([[6], [300]], np.int32)}, "validation")
    metrics.refused({"_input_lengths": np.array([[6]], np.int32),
                     "stream": np.array([[True]])}, "conc_limit")
    assert publisher.values("tgi_request_failure", ("cancelled",)) == [1]
    assert publisher.values("tgi_request_failure", ("validation",)) == [1]
    assert publisher.values("tgi_request_failure", ("conc_limit",)) == [1]
    assert publisher.values("tgi_request_count", ("stream",)) == [1, 1]
    assert publisher.values("tgi_request_count", ("batch",)) == [1]
    assert publisher.values("tgi_request_raw_input_length") == [2, 6, 300, 6]
    assert publisher.values("tgi_request_input_length") == [2]   # refused prompts are not
    assert not [u for u in publisher.updates if u[0] == "tgi_request_success"]
    assert metrics._requests == {} and metrics._awaiting_first == {}


def test_prompts_and_generated_tokens_are_counted_per_adapter(clock):
    publisher = ListPublisher()
    metrics = RequestMetrics(publisher)
    sink = object()
    metrics.accepted(sink, [prompt(3, adapter="sql"), prompt(5), prompt(4, adapter="sql")],
                     [1, 2, 3], clock[0])
    metrics.delivered([(sink, response(1, "length", 4, batch_index=0), None, False),
                       (sink, response(2, "length", 6, batch_index=1), None, False),
                       (sink, response(3, "eos_token", 2, batch_index=2), None, True)])
    assert publisher.values("textgen_adapter_requests_total", ("sql",)) == [1, 1]
    assert publisher.values("textgen_adapter_requests_total", ("",)) == [1]
    assert publisher.values("textgen_adapter_generated_tokens_total", ("sql",)) == [4, 2]
    assert publisher.values("textgen_adapter_generated_tokens_total", ("",)) == [6]
