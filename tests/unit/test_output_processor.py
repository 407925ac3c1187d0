"""Tokens -> responses: streaming deltas, whole results, one final per request, coalescing."""
import time

import pytest

from assets import byte_level_bpe_tokenizer
from textgen_backend.serving.output_processor import Candidate, OutputProcessor
from textgen_backend.sampling.params import DetailsParams, RequestParams, SamplingParams, StoppingParams
from textgen_backend.serving.request import Prompt
from textgen_backend.engine.scheduler import StepOutput, TokenLogprob

pytestmark = pytest.mark.unit

TEXT = "Streams of tokens become text, one delta at a time."


class ListSink:
    def __init__(self):
        self.sent = []   # (response, error, final)

    def send(self, response, error, final):
        self.sent.append((response, error, final))

    def is_cancelled(self):
        return False


def prompt(index=0, stream=True, stops=(), max_tokens=50, include_stop=True, best_of=1,
           returned=1, details=DetailsParams(), candidate=0, deadline=None):
    """A Candidate (one generated sequence) of a prompt with these parameters."""
    stopping = StoppingParams(max_tokens=max_tokens, stop_sequences=tuple(stops),
                              include_stop_sequence=include_stop)
    params = RequestParams(SamplingParams(do_sample=best_of > 1), stopping, details=details,
                           stream=stream, best_of=best_of, num_return_sequences=returned)
    return Candidate(Prompt([5, 6], "prompt", index, params), candidate, 42 + candidate, deadline)


def setup(responses_per_second=1e9, **kw):
    tokenizer = byte_level_bpe_tokenizer()
    processor = OutputProcessor(tokenizer, responses_per_second)
    sink = ListSink()
    return tokenizer, processor, sink


def deliver(processor, outputs):
    result = processor.process(outputs)
    for sink, response, error, final in result.sends:
        sink.send(response, error, final)
    return result


def feed_tokens(processor, seq_id, ids, finish="length"):
    for i, token in enumerate(ids):
        deliver(processor, [StepOutput(seq_id, [token], finish if i == len(ids) - 1 else None)])


def test_streaming_deltas_concatenate_to_the_decoded_text_with_one_final():
    tokenizer, processor, sink = setup()
    ids = tokenizer(TEXT)["input_ids"]
    processor.register(sink, [prompt()], [1])
    feed_tokens(processor, 1, ids)
    assert "".join(r.text for r, _, _ in sink.sent) == tokenizer.decode(ids)
    assert [t for r, _, _ in sink.sent for t in r.output_ids] == ids
    assert [final for _, _, final in sink.sent] == [False] * (len(sink.sent) - 1) + [True]
    assert sink.sent[-1][0].finish_reason == "length" and sink.sent[-1][0].num_output_tokens == len(ids)
    assert processor.requests == {}


def test_non_streaming_sends_one_whole_response():
    tokenizer, processor, sink = setup()
    ids = tokenizer(TEXT)["input_ids"]
    processor.register(sink, [prompt(stream=False)], [1])
    feed_tokens(processor, 1, ids)
    assert len(sink.sent) == 1
    response, error, final = sink.sent[0]
    assert final and error is None and response.text == TEXT and response.output_ids == ids


def test_stop_sequence_ends_at_the_matching_token_and_asks_the_engine_to_stop():
    tokenizer, processor, sink = setup()
    ids = tokenizer(TEXT)["input_ids"]
    processor.register(sink, [prompt(stream=False, stops=["text,"])], [1])
    stopped = []
    for token in ids:
        stopped += deliver(processor, [StepOutput(1, [token])]).stop_seq_ids
    assert stopped == [1]
    response = sink.sent[0][0]
    assert response.text == "Streams of tokens become text," and response.finish_reason == "stop"
    assert tokenizer.decode(response.output_ids).endswith("text,")
    assert not tokenizer.decode(response.output_ids[:-1]).endswith("text,")


def test_batch_request_gets_exactly_one_final_after_its_last_prompt():
    tokenizer, processor, sink = setup()
    processor.register(sink, [prompt(0, max_tokens=2), prompt(1, max_tokens=2)], [1, 2])
    deliver(processor, [StepOutput(1, [40]), StepOutput(2, [41])])
    deliver(processor, [StepOutput(2, [42], "length")])
    assert [f for _, _, f in sink.sent] == [False, False, False]
    deliver(processor, [StepOutput(1, [43], "eos_token")])
    assert [f for _, _, f in sink.sent][-1] is True
    assert sum(f for _, _, f in sink.sent) == 1
    assert {r.batch_index for r, _, _ in sink.sent} == {0, 1}


def test_error_fails_the_request_once_and_stops_its_other_prompts():
    tokenizer, processor, sink = setup()
    processor.register(sink, [prompt(0), prompt(1)], [1, 2])
    result = deliver(processor, [StepOutput(1, [], "error", "boom")])
    assert sink.sent == [(None, "boom", True)] and result.stop_seq_ids == [2]
    deliver(processor, [StepOutput(2, [40])])
    assert len(sink.sent) == 1


def test_many_streams_coalesce_tokens_into_fewer_responses():
    tokenizer, processor, sink = setup(responses_per_second=2.0)  # 2 streams: one per second each
    ids = tokenizer(TEXT)["input_ids"]
    other = ListSink()
    processor.register(sink, [prompt()], [1])
    processor.register(other, [prompt()], [2])
    for token in ids[:-1]:
        deliver(processor, [StepOutput(1, [token]), StepOutput(2, [token])])
    assert len(sink.sent) == 1                       # the first delta goes out at once
    assert processor.flush_due().sends == []          # the rest waits for its turn
    deliver(processor, [StepOutput(1, [ids[-1]], "length")])
    assert len(sink.sent) == 2 and sink.sent[-1][2]   # finishing flushes everything
    assert "".join(r.text for r, _, _ in sink.sent) == TEXT
    time.sleep(processor.stream_interval())
    assert [s for s, *_ in processor.flush_due().sends] == [other]


def test_include_stop_sequence_false_drops_the_match_and_reports_it():
    tokenizer, processor, sink = setup()
    ids = tokenizer(TEXT)["input_ids"]
    processor.register(sink, [prompt(stream=False, stops=["text,"], include_stop=False)], [1])
    for token in ids:
        deliver(processor, [StepOutput(1, [token])])
    response = sink.sent[0][0]
    assert response.text == "Streams of tokens become "
    assert (response.finish_reason, response.stop_reason, response.stop_sequence) == (
        "stop", "stop_sequence", "text,")
    assert response.seed == 42


def test_time_limit_finishes_with_the_text_so_far():
    tokenizer, processor, sink = setup()
    ids = tokenizer(TEXT)["input_ids"]
    processor.register(sink, [prompt(stream=False, deadline=time.monotonic() + 0.05)], [1])
    deliver(processor, [StepOutput(1, [ids[0]])])
    assert sink.sent == []
    time.sleep(0.06)
    result = deliver(processor, [StepOutput(1, [ids[1]])])
    assert result.stop_seq_ids == [1]
    response = sink.sent[0][0]
    assert response.finish_reason == "time_limit" and response.stop_reason == "time_limit"
    assert response.output_ids == ids[:2] and response.text == tokenizer.decode(ids[:2])


def test_time_limit_ends_a_queued_sequence_on_the_timer():
    tokenizer, processor, sink = setup()
    processor.register(sink, [prompt(stream=False, deadline=time.monotonic())], [1])
    result = processor.flush_due()
    assert result.stop_seq_ids == [1]
    (_, response, _, final), = result.sends
    assert final and response.finish_reason == "time_limit" and response.output_ids == []


def test_best_of_returns_the_candidates_with_the_highest_cumulative_logprob():
    tokenizer, processor, sink = setup()
    cands = [prompt(stream=False, best_of=3, returned=2, candidate=i) for i in range(3)]
    processor.register(sink, cands, [1, 2, 3])
    for seq_id, logprob in ((1, -3.0), (2, -1.0), (3, -2.0)):
        lps = [TokenLogprob(logprob / 2, 1, []), TokenLogprob(logprob / 2, 1, [])]
        deliver(processor, [StepOutput(seq_id, [40 + seq_id, 41], "length", logprobs=lps)])
    assert [(r.sequence_id, r.sequence_index, f) for r, _, f in sink.sent] == [
        (2, 0, False), (3, 1, True)]
    assert sink.sent[0][0].seed == 43


def test_token_details_and_input_details_are_json_per_token():
    tokenizer, processor, sink = setup()
    details = DetailsParams(log_probs=True, top_n_tokens=2, input_details=True)
    processor.register(sink, [prompt(details=details)], [1])
    lp = TokenLogprob(-0.5, 2, [(7, -0.2), (40, -0.5)])
    deliver(processor, [StepOutput(1, [40], logprobs=[lp],
                                   prompt_logprobs=[None, TokenLogprob(-1.5, 3, [])])])
    deliver(processor, [StepOutput(1, [41], "length", logprobs=[TokenLogprob(-0.25, 1, [])])])
    first, second = sink.sent[0][0], sink.sent[1][0]
    import json
    entry = json.loads(first.token_details[0])
    assert entry["id"] == 40 and entry["logprob"] == -0.5 and entry["rank"] == 2
    assert entry["text"] == tokenizer.decode([40])
    assert [t["id"] for t in entry["top_tokens"]] == [7, 40]
    assert first.output_log_probs == [-0.5] and first.cum_log_prob == -0.5
    assert second.cum_log_prob == -0.75 and second.output_log_probs == [-0.25]
    prompt_details = [json.loads(d) for d in first.input_token_details]
    assert [d["id"] for d in prompt_details] == [5, 6]
    assert prompt_details[0]["logprob"] is None and prompt_details[1]["rank"] == 3
    assert second.input_token_details == []


def test_cancellation_polls_ask_a_bounded_share_of_the_clients_in_turn():
    from textgen_backend.serving.output_processor import CANCEL_CHECKS_PER_POLL

    class CountingSink(ListSink):
        def __init__(self, cancelled=False):
            super().__init__()
            self.asked, self.cancelled = 0, cancelled

        def is_cancelled(self):
            self.asked += 1
            return self.cancelled

    _, processor, _ = setup()
    n = 2 * CANCEL_CHECKS_PER_POLL + 3
    sinks = [CountingSink(cancelled=(i == n - 1)) for i in range(n)]
    for i, sink in enumerate(sinks):
        processor.register(sink, [prompt()], [i])
    found = []
    for poll in range(3):
        found += processor.newly_cancelled()
        assert sum(s.asked for s in sinks) == (poll + 1) * CANCEL_CHECKS_PER_POLL
    assert found == [[n - 1]]                   # the last client, reached on the third poll
    assert all(s.asked >= 1 for s in sinks)     # three polls went round all of them once
    assert processor.newly_cancelled() == []    # a cancelled request is not asked again
