"""One row's parameters never change another row's token: random mixes of every logits
parameter across a batch, each row against the same row sampled alone (issue 10)."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from textgen_backend.sampling.sampler import build_sampling_batch, sample
from textgen_backend.engine.sequence import Sequence

pytestmark = pytest.mark.unit
V = 24
EOS = (2, 3)
CPU = torch.device("cpu")
TOKENS = st.integers(0, V - 1)


def off_or(off, on):
    return st.one_of(st.just(off), on)


@st.composite
def requests(draw):
    """(prompt, output so far, sampling, stopping, details) of one row."""
    word = st.lists(st.sampled_from(EOS) | TOKENS, min_size=1, max_size=2).map(tuple)
    sampling = SamplingParams(
        do_sample=draw(st.booleans()),
        temperature=draw(st.floats(0.1, 3.0)),
        top_k=draw(off_or(0, st.integers(1, V + 4))),
        top_p=draw(off_or(1.0, st.floats(0.05, 1.0))),
        typical_p=draw(off_or(1.0, st.floats(0.05, 1.0))),
        min_p=draw(off_or(0.0, st.floats(0.0, 1.0))),
        repetition_penalty=draw(off_or(1.0, st.floats(0.5, 2.0))),
        presence_penalty=draw(off_or(0.0, st.floats(-2.0, 2.0))),
        frequency_penalty=draw(off_or(0.0, st.floats(-2.0, 2.0))),
        seed=draw(st.integers(0, 2**64 - 1)),
        length_penalty=draw(st.none() | st.tuples(st.integers(0, 8),
                                                  off_or(1.0, st.floats(1.0, 10.0)))),
        bad_words_ids=tuple(draw(st.lists(word, max_size=3))),
        watermark=draw(st.booleans()),
    )
    stopping = StoppingParams(max_tokens=32, min_tokens=draw(st.integers(0, 12)),
                              ignore_eos=draw(st.booleans()))
    details = DetailsParams(log_probs=draw(st.booleans()), top_n_tokens=draw(st.integers(0, 5)))
    return (draw(st.lists(TOKENS, min_size=1, max_size=6)), draw(st.lists(TOKENS, max_size=10)),
            sampling, stopping, details)


def sequence(row, request):
    prompt, output, sampling, stopping, details = request
    return Sequence(row, prompt, sampling, stopping, output_ids=list(output), details=details,
                    track_logprobs=details.per_token)


def banned(seq):
    """Tokens the row must never get: EOS before min_tokens, bad words whose prefix is there."""
    tokens = set()
    if len(seq.output_ids) < seq.stopping.min_tokens and not seq.stopping.ignore_eos:
        tokens |= set(EOS)
    for word in seq.sampling.bad_words_ids:
        prefix = list(word[:-1])
        if not prefix or seq.all_ids[-len(prefix):] == prefix:
            tokens.add(word[-1])
    return tokens


# The issue's case: a greedy row with min_tokens=8 beside a row with a length penalty.
ISSUE_10 = [([5, 6], [7, 8, 9], SamplingParams(length_penalty=(1, 1.5)), StoppingParams(),
             DetailsParams()),
            ([5], [7], SamplingParams(), StoppingParams(min_tokens=8), DetailsParams())]


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(requests(), min_size=1, max_size=6), st.integers(0, 2**32 - 1),
       st.sampled_from([1.0, 5.0, 40.0]))  # 40: many probabilities underflow to 0
@example(ISSUE_10, 0, 1.0)
def test_each_row_samples_as_if_alone(batch, logits_seed, scale):
    seqs = [sequence(row, request) for row, request in enumerate(batch)]
    logits = torch.randn(len(seqs), V, generator=torch.Generator().manual_seed(logits_seed))
    logits *= scale
    together = sample(logits.clone(), build_sampling_batch(seqs, EOS, V, CPU))
    for row, seq in enumerate(seqs):
        alone = sample(logits[row:row + 1].clone(), build_sampling_batch([seq], EOS, V, CPU))
        token = together.token_ids[row]
        assert token == alone.token_ids[0], row
        assert token not in banned(seq), row  # a NaN score wins argmax, banned or not
        if seq.track_logprobs:
            assert (together.logprobs[row], together.ranks[row]) == (alone.logprobs[0],
                                                                      alone.ranks[0])
        top_n = seq.details.top_n_tokens
        if top_n:
            assert together.top_ids[row][:top_n] == alone.top_ids[0]
            assert together.top_logprobs[row][:top_n] == alone.top_logprobs[0]
