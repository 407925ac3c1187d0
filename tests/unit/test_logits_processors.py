"""Each batched logits transform against transformers' processor on the same logits, with
per-row parameters (including rows that disable the transform)."""
import pytest
import torch
from transformers.generation import logits_process as hf

from textgen_backend.sampling import logits_processors as lp
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from textgen_backend.sampling.sampler import build_sampling_batch, sample
from textgen_backend.engine.sequence import Sequence

pytestmark = pytest.mark.unit
V = 50


@pytest.fixture
def logits():
    return torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3


def rows_of(processor_per_row, logits, input_ids=None):
    """transformers processors take one parameter for the batch: apply row by row."""
    ids = input_ids if input_ids is not None else torch.zeros(len(logits), 1, dtype=torch.long)
    return torch.cat([proc(ids[i:i + 1], logits[i:i + 1].clone())
                      for i, proc in enumerate(processor_per_row)])


def assert_same(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


def test_top_k_then_top_p(logits):
    top_k, top_p = torch.tensor([5, V, 12]), torch.tensor([1.0, 0.7, 0.9])
    theirs = rows_of([lambda i, s, k=k, p=p: hf.TopPLogitsWarper(p)(i, hf.TopKLogitsWarper(k)(i, s))
                      for k, p in zip(top_k.tolist(), top_p.tolist())], logits)
    assert_same(lp.top_k_top_p(logits, top_k, top_p), theirs)


def test_min_p(logits):
    min_p = torch.tensor([0.0, 0.05, 0.3])
    theirs = rows_of([hf.MinPLogitsWarper(m) if m > 0 else (lambda i, s: s)
                      for m in min_p.tolist()], logits)
    assert_same(lp.min_p(logits, min_p), theirs)


def test_typical(logits):
    mass = torch.tensor([1.0, 0.5, 0.9])
    theirs = rows_of([hf.TypicalLogitsWarper(m) if m < 1 else (lambda i, s: s)
                      for m in mass.tolist()], logits)
    assert_same(lp.typical(logits, mass), theirs)


def test_repetition_penalty(logits):
    input_ids = torch.tensor([[3, 7, 7], [1, 2, 3], [40, 41, 3]])
    penalty = torch.tensor([1.0, 1.3, 0.7])
    theirs = rows_of([hf.RepetitionPenaltyLogitsProcessor(p) for p in penalty.tolist()],
                     logits, input_ids)
    seen = torch.zeros(3, V, dtype=torch.bool).scatter_(1, input_ids, True)
    zeros = torch.zeros(3)
    ours = lp.apply_penalties(logits, penalty, zeros, zeros, seen, torch.zeros(3, V))
    assert_same(ours, theirs)


def test_bad_words_and_min_new_tokens_through_the_sampling_batch(logits):
    eos = 2
    seqs = [Sequence(0, [5, 6], SamplingParams(bad_words_ids=((9,), (6, 11))),
                     StoppingParams(min_tokens=3)),
            Sequence(1, [5, 7], SamplingParams(bad_words_ids=((6, 11),)), StoppingParams())]
    batch = build_sampling_batch(seqs, (eos,), V, torch.device("cpu"))
    ours = lp.ban_tokens(logits[:2], *batch.banned)
    ids = torch.tensor([[5, 6], [5, 7]])
    theirs = torch.cat([
        hf.MinNewTokensLengthLogitsProcessor(2, 3, eos)(
            ids[:1], hf.NoBadWordsLogitsProcessor([[9], [6, 11]], eos)(ids[:1], logits[:1].clone())),
        hf.NoBadWordsLogitsProcessor([[6, 11]], eos)(ids[1:], logits[1:2].clone())])
    assert_same(ours, theirs)
    assert torch.isinf(ours[0, 11]) and not torch.isinf(ours[1, 11])  # prefix 6 only in row 0


def test_exponential_decay_length_penalty(logits):
    eos = torch.tensor([2])
    prompt_len, start, decay, generated = 4, 3, 1.5, 6
    ids = torch.zeros(1, prompt_len + generated, dtype=torch.long)
    theirs = hf.ExponentialDecayLengthPenalty((start, decay), 2, prompt_len)(ids, logits[:1].clone())
    ours = lp.exponential_decay_length_penalty(logits[:1], torch.tensor([generated - start]),
                                               torch.tensor([decay]), eos)
    assert_same(ours, theirs)
    assert ours[0, 2] != logits[0, 2]
    untouched = lp.exponential_decay_length_penalty(logits[:1], torch.tensor([0]),
                                                    torch.tensor([decay]), eos)
    assert torch.equal(untouched, logits[:1])


def test_watermark_biases_a_green_list_seeded_by_the_previous_token(logits):
    out = lp.watermark(logits, [0, 2], [17, 17], gamma=0.5, delta=2.0)
    for row in (0, 2):
        boosted = (out[row] - logits[row]).isclose(torch.tensor(2.0))
        assert boosted.sum() == V // 2
    assert torch.equal(out[1], logits[1])
    # TGI's green list: the first gamma*V of randperm seeded with hash_key * previous token.
    g = torch.Generator().manual_seed(lp.WATERMARK_HASH_KEY * 17)
    green = torch.randperm(V, generator=g)[:V // 2]
    assert torch.equal((out[0] - logits[0] > 1).nonzero().flatten().sort().values,
                       green.sort().values)


def test_logprobs_ranks_and_top_n_come_from_the_model_distribution(logits):
    seqs = [Sequence(i, [1], SamplingParams(repetition_penalty=1.5), StoppingParams(),
                     details=DetailsParams(log_probs=True, top_n_tokens=3), track_logprobs=True)
            for i in range(3)]
    out = sample(logits.clone(), build_sampling_batch(seqs, (), V, torch.device("cpu")))
    log_probs = torch.log_softmax(logits, dim=-1)
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(log_probs[row, token].item(), abs=1e-6)
        assert out.ranks[row] == int((log_probs[row] > log_probs[row, token]).sum()) + 1
        top = log_probs[row].topk(3)
        assert out.top_ids[row] == top.indices.tolist()
        assert out.top_logprobs[row] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_length_penalty_leaves_banned_eos_and_rows_without_a_factor_as_they_are(logits):
    """Issue 10: -inf * 0 and -inf + inf were NaN, which greedy argmax picked."""
    eos = 2
    banned = logits.clone()
    banned[:2, eos] = float("-inf")  # rows 0, 1: EOS banned (min_tokens, bad words)
    over, decay = torch.tensor([3, 0, 0]), torch.tensor([1.5, 1.5, 1.0])  # factor > 0, 0, 0
    ours = lp.exponential_decay_length_penalty(banned, over, decay, torch.tensor([eos]))
    theirs = hf.ExponentialDecayLengthPenalty((0, 1.5), eos, 0)(
        torch.zeros(1, 3, dtype=torch.long), banned[:1].clone())
    assert torch.equal(ours[0], theirs[0])
    assert ours[0, eos] == float("-inf")
    assert torch.equal(ours[1:], banned[1:])


def test_length_penalty_of_decay_1_is_a_no_op(logits):
    scores = logits.clone()
    scores[0, 2] = float("-inf")  # EOS banned before min_tokens
    ours = lp.exponential_decay_length_penalty(scores, torch.tensor([5, 1, 9]),
                                               torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2]))
    assert torch.equal(ours, scores)


def test_overflowing_length_penalty_never_makes_nan(logits):
    eos = torch.tensor([2, 3])
    scores = logits.clone()
    scores[:, 2], scores[:, 3] = 0.0, -3.0  # decay**over overflows float32: 0 * inf was NaN
    ours = lp.exponential_decay_length_penalty(scores, torch.tensor([1000] * 3),
                                               torch.tensor([10.0] * 3), eos)
    assert torch.equal(ours[:, 2], torch.zeros(3))
    assert torch.equal(ours[:, 3], torch.full((3,), float("inf")))


def test_a_sampled_row_with_infinite_eos_samples_eos(logits):
    eos = 2
    scores = logits[:1].clone()
    scores[0, eos] = -3.0
    seq = Sequence(0, [1], SamplingParams(do_sample=True, top_k=5, typical_p=0.9, min_p=0.1,
                                          length_penalty=(0, 10.0), seed=3),
                   StoppingParams(max_tokens=200), output_ids=[4] * 100)
    out = sample(scores, build_sampling_batch([seq], (eos,), V, torch.device("cpu")))
    assert out.token_ids == [eos]  # softmax of a +inf score was NaN everywhere: token 0


def test_top_p_of_1_keeps_every_token(logits):
    # A dominant token gets probability 1.0 in float32: the cumsum reaches 1 at the tail.
    scores = logits.clone()
    scores[:, 0] = 30.0
    top_k, top_p = torch.tensor([V, V, 3]), torch.tensor([1.0, 1.0, 0.5])
    ours = lp.top_k_top_p(scores, top_k, top_p)
    assert torch.equal(ours[:2], scores[:2])
    assert torch.isinf(ours[2]).sum() == V - 1  # row 2 keeps its top token only


def test_the_exponential_race_never_picks_a_token_of_probability_0():
    # At seed 2939170 and step 3, token 13 draws the top 24-bit value, whose float32
    # uniform rounded to 1: E = 0 and p / E = 0 / 0 = NaN for a truncated token.
    scores = torch.arange(16, 0, -1, dtype=torch.float32)  # token 13 is far from the top
    seq = Sequence(0, [1], SamplingParams(do_sample=True, top_k=1, seed=2939170),
                   StoppingParams(), output_ids=[4, 5, 6])
    out = sample(scores[None], build_sampling_batch([seq], (), 16, torch.device("cpu")))
    assert out.token_ids == [0]
