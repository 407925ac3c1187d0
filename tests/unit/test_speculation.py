"""Speculative decoding in the engine (CPU, float32, tiny model): whatever the drafts, the output
equals decoding without them -- greedy against transformers, and sampling with every logits
processor row by row against the same engine without --speculate -- while accepted drafts cut
the steps. A random model never repeats itself, so an oracle proposer (the reference
continuation, its last draft corrupted every few steps) makes drafts land."""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import textgen_backend.speculation.speculator as speculator_module
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.scheduler import Scheduler
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from textgen_backend.speculation.ngram import propose_ngram
from draft_oracle import medusa_oracle, oracle_drafts
from medusa_heads import add_random_medusa
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("speculation") / "model", "llama")


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _engine(model_dir, **overrides) -> Engine:
    config = dict(model_id=str(model_dir), max_input_tokens=100, max_total_tokens=200,
                  block_size=4)
    return Engine(EngineConfig(**{**config, **overrides}), model_dir)


def _run(engine: Engine, seqs: list[Sequence]) -> int:
    for seq in seqs:
        engine.add(seq)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    return steps


def _greedy(seq_id, prompt, tokens, **stopping):
    return Sequence(seq_id, prompt, SamplingParams(),
                    StoppingParams(max_tokens=tokens, **{"ignore_eos": True, **stopping}))


def _hf_greedy(hf, prompt, tokens):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def _prompts(count, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, 400) for _ in range(rng.randrange(3, 30))] for _ in range(count)]


def test_ngram_drafts_follow_the_most_recent_earlier_occurrence():
    def reference(history, num_drafts):  # the rule, one position at a time
        for n in (3, 2, 1):
            if len(history) <= n:
                continue
            for start in range(len(history) - n - 1, -1, -1):
                if history[start:start + n] == history[-n:]:
                    return history[start + n:start + n + num_drafts]
        return []

    rng = random.Random(0)
    histories = [[rng.randrange(6) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    histories += [[], [1], [1, 1], [1, 2, 3, 1, 2, 3], [9, 1, 2, 8, 1, 2, 7, 7, 1, 2]]
    histories = [h for h in histories if h]
    for num_drafts in (1, 3, 5):
        assert propose_ngram(histories, num_drafts) == [reference(h, num_drafts)
                                                         for h in histories]
    assert propose_ngram([[9, 1, 2, 8, 1, 2, 7, 7, 1, 2]], 3) == [[7, 7, 1]]


@pytest.mark.parametrize("speculate", [1, 2, 3, 4, 5])
def test_greedy_with_drafts_equals_transformers_in_fewer_steps(model_dir, hf, monkeypatch,
                                                                speculate):
    prompts = _prompts(6)
    tokens = [12 + 5 * i for i in range(len(prompts))]
    expected = [_hf_greedy(hf, p, n) for p, n in zip(prompts, tokens)]
    plain_steps = _run(_engine(model_dir), [_greedy(i, p, n) for i, (p, n) in
                                            enumerate(zip(prompts, tokens))])
    oracle_drafts(monkeypatch, [p + e for p, e in zip(prompts, expected)])
    engine = _engine(model_dir, speculate=speculate)
    seqs = [_greedy(i, p, n) for i, (p, n) in enumerate(zip(prompts, tokens))]
    steps = _run(engine, seqs)
    assert [s.output_ids for s in seqs] == expected
    stats = engine.stats()
    assert stats.speculation_method == "ngram"
    assert 0 < stats.speculation_accepted_tokens < stats.speculation_draft_tokens
    assert steps < plain_steps - speculate  # several tokens per step
    assert stats.kv_blocks_used == 0        # rejected drafts' blocks came back


def _mixed_rows() -> list[tuple[SamplingParams, StoppingParams, DetailsParams]]:
    sampled = dict(do_sample=True, temperature=0.7, top_k=40)
    return [
        (SamplingParams(), StoppingParams(max_tokens=20, ignore_eos=True), DetailsParams()),
        (SamplingParams(**sampled, seed=11), StoppingParams(max_tokens=24, ignore_eos=True),
         DetailsParams(log_probs=True, top_n_tokens=3)),
        (SamplingParams(repetition_penalty=1.6, presence_penalty=0.4, frequency_penalty=0.3),
         StoppingParams(max_tokens=18, ignore_eos=True), DetailsParams(log_probs=True)),
        (SamplingParams(**sampled, top_p=0.8, seed=5, repetition_penalty=1.3),
         StoppingParams(max_tokens=22, ignore_eos=True), DetailsParams()),
        (SamplingParams(bad_words_ids=((7,), (12, 13))), StoppingParams(max_tokens=16,
                                                                         ignore_eos=True),
         DetailsParams()),
        (SamplingParams(do_sample=True, typical_p=0.9, min_p=0.05, seed=3),
         StoppingParams(max_tokens=15, min_tokens=10), DetailsParams(log_probs=True)),
    ]


def test_every_sampling_parameter_gives_the_same_tokens_and_details(model_dir, monkeypatch):
    prompts = _prompts(6, seed=1)

    def seqs():
        return [Sequence(i, p, sampling, stopping, details=details, track_logprobs=True)
                for i, (p, (sampling, stopping, details)) in enumerate(zip(prompts,
                                                                           _mixed_rows()))]

    plain = seqs()
    _run(_engine(model_dir), plain)
    oracle_drafts(monkeypatch, [p + s.output_ids for p, s in zip(prompts, plain)])
    engine = _engine(model_dir, speculate=4)
    drafted = seqs()
    outputs = {}
    for seq in drafted:
        engine.add(seq)
    while engine.has_work():
        for out in engine.step():
            outputs.setdefault(out.seq_id, []).extend(out.logprobs or [])
    assert [s.output_ids for s in drafted] == [s.output_ids for s in plain]
    assert engine.stats().speculation_accepted_tokens > 20
    reference = {}
    engine = _engine(model_dir)
    for seq in seqs():
        engine.add(seq)
    while engine.has_work():
        for out in engine.step():
            reference.setdefault(out.seq_id, []).extend(out.logprobs or [])
    for seq_id, details in reference.items():
        assert len(outputs[seq_id]) == len(details)
        for got, want in zip(outputs[seq_id], details):
            assert got.rank == want.rank and got.logprob == pytest.approx(want.logprob, abs=1e-5)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_an_eos_among_the_drafts_ends_the_output_there(model_dir, hf, monkeypatch, tmp_path):
    prompt = _prompts(1, seed=2)[0]
    greedy = _hf_greedy(hf, prompt, 30)
    eos = greedy[9]
    # the same model with that token as its EOS (the tiny model never samples its own)
    eos_dir = tmp_path / "eos-model"
    shutil.copytree(model_dir, eos_dir)
    for name in ("config.json", "generation_config.json"):
        if (eos_dir / name).exists():
            config = json.loads((eos_dir / name).read_text())
            (eos_dir / name).write_text(json.dumps({**config, "eos_token_id": eos}))
    oracle_drafts(monkeypatch, [prompt + greedy])
    engine = _engine(eos_dir, speculate=5)
    seq = _greedy(0, prompt, 30, ignore_eos=False)
    short = _greedy(1, prompt, 7)  # max_tokens inside a step's drafts
    _run(engine, [seq, short])
    assert seq.output_ids == greedy[:greedy.index(eos) + 1]
    assert seq.finish_reason == "eos_token"
    assert short.output_ids == greedy[:7] and short.finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("method", ["ngram", "medusa"])
def test_preemption_with_drafts_still_gives_the_same_outputs(model_dir, hf, monkeypatch,
                                                             tmp_path, method):
    """Drafts from the oracle (every third step's last one wrong); Medusa's random heads never
    draft right, so there the oracle stands in for their proposals."""
    prompts = _prompts(8, seed=3)
    expected = [_hf_greedy(hf, p, 40) for p in prompts]
    continuations = [p + e for p, e in zip(prompts, expected)]
    if method == "medusa":
        model = add_random_medusa(model_dir, tmp_path / "medusa", num_heads=3)
        medusa_oracle(monkeypatch, continuations)
    else:
        model = model_dir
        oracle_drafts(monkeypatch, continuations)
    # 40 blocks of 4 tokens: far less than 8 sequences of ~60 tokens need
    engine = _engine(model, speculate=3, max_input_tokens=40, max_total_tokens=100,
                     max_batch_total_tokens=160)
    seqs = [_greedy(i, p, 40) for i, p in enumerate(prompts)]
    _run(engine, seqs)
    assert [s.output_ids for s in seqs] == expected
    stats = engine.stats()
    assert stats.speculation_method == method and stats.num_preemptions > 0
    assert 0 < stats.speculation_accepted_tokens < stats.speculation_draft_tokens
    assert stats.kv_blocks_used == 0


FIRST_PROMPT = [5, 9, 17, 33]


def _first_tokens(model_dir, speculate: int, seeds: range, stats: dict | None = None) -> Counter:
    """How often each (t1, t2, t3) came first over the seeds, sampled at temperature 0.8."""
    engine = _engine(model_dir, speculate=speculate, speculation_max_batch_size=len(seeds))
    seqs = [Sequence(seed, FIRST_PROMPT, SamplingParams(do_sample=True, temperature=0.8,
                                                          seed=seed),
                     StoppingParams(max_tokens=3, ignore_eos=True)) for seed in seeds]
    _run(engine, seqs)
    if stats is not None:
        stats["accepted"] = engine.stats().speculation_accepted_tokens
    return Counter(tuple(s.output_ids) for s in seqs)


def _chi_square_p(expected: Counter, observed: Counter) -> float:
    """p-value of observed against expected counts (the 15 most common outcomes of expected,
    the rest pooled), by the chi-square distribution's survival function."""
    top = [key for key, _ in expected.most_common(15)]
    e = np.array([expected[k] for k in top] + [sum(expected.values()) -
                                                sum(expected[k] for k in top)], dtype=float)
    o = np.array([observed[k] for k in top] + [sum(observed.values()) -
                                                sum(observed[k] for k in top)], dtype=float)
    e = np.maximum(e, 0.5)
    statistic = float(((o - e) ** 2 / e).sum())
    return float(torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _draft_greedy_continuation(monkeypatch, hf) -> None:
    """Drafts what greedy decoding of FIRST_PROMPT continues with, at whatever position."""
    greedy = _hf_greedy(hf, FIRST_PROMPT, 3)
    monkeypatch.setattr(speculator_module, "propose_ngram", lambda histories, n: [
        greedy[len(h) - len(FIRST_PROMPT):][:n] for h in histories])


def test_sampled_tokens_keep_their_distribution(model_dir, hf, monkeypatch):
    """Greedy drafts under sampling at temperature 0.8: the first three tokens over 800 seeds
    are distributed as without drafts (chi-square, p > 0.01) -- and the second test shows the
    check fails for an acceptance rule that keeps every draft."""
    seeds = range(800)
    plain = _first_tokens(model_dir, 0, seeds)
    _draft_greedy_continuation(monkeypatch, hf)
    engine_stats = {}
    drafted = _first_tokens(model_dir, 2, seeds, engine_stats)
    assert engine_stats["accepted"] > 20  # of 800 one-token drafts (a flat random model)
    assert _chi_square_p(plain, drafted) > 0.01
    assert drafted == plain  # seeded sampling: the same draw per seed, drafts or not


def test_a_biased_acceptance_rule_fails_the_distribution_check(model_dir, hf, monkeypatch):
    seeds = range(800)
    plain = _first_tokens(model_dir, 0, seeds)
    _draft_greedy_continuation(monkeypatch, hf)
    accept = Scheduler._accept

    def keep_every_draft(self, seq, drafts, sampled, rows):
        sampled.token_ids[rows.start:rows.start + len(drafts)] = drafts  # the broken rule
        return accept(self, seq, drafts, sampled, rows)

    monkeypatch.setattr(Scheduler, "_accept", keep_every_draft)
    biased = _first_tokens(model_dir, 2, seeds)
    assert _chi_square_p(plain, biased) < 1e-6


def test_medusa_heads_are_picked_up_and_keep_greedy_exact(model_dir, hf, tmp_path):
    medusa_dir = add_random_medusa(model_dir, tmp_path / "medusa", num_heads=3)
    prompts = _prompts(4, seed=4)
    engine = _engine(medusa_dir, speculate=5)  # more drafts than heads: 3 per step
    seqs = [_greedy(i, p, 20) for i, p in enumerate(prompts)]
    _run(engine, seqs)
    assert [s.output_ids for s in seqs] == [_hf_greedy(hf, p, 20) for p in prompts]
    stats = engine.stats()
    assert stats.speculation_method == "medusa"
    assert stats.speculation_draft_tokens >= 3 * 4 * 10  # three a step for most steps
    assert stats.kv_blocks_used == 0


def test_medusa_weights_that_do_not_match_the_config_are_refused(model_dir, tmp_path):
    medusa_dir = add_random_medusa(model_dir, tmp_path / "medusa", num_heads=2)
    config = json.loads((medusa_dir / "config.json").read_text())
    (medusa_dir / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 3}))
    with pytest.raises(ValueError, match="medusa_num_heads"):
        _engine(medusa_dir, speculate=2)


def test_a_heads_only_medusa_repository_serves_its_base_model_with_all_heads(
        model_dir, hf, tmp_path, monkeypatch):
    """TGI's Medusa repositories hold the heads and name their base model: the model id is
    the repository, the base model's weights serve, and without --speculate every head
    drafts (TGI)."""
    from textgen_backend.weights.loading import resolve_model_dir

    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    full = add_random_medusa(model_dir, tmp_path / "full", num_heads=3)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(full / "medusa_lm_head.safetensors", repo)
    (repo / "config.json").write_text(json.dumps({
        "base_model_name_or_path": str(model_dir), "medusa_num_heads": 3,
        "medusa_num_layers": 1, "model_type": "medusa"}))
    served = resolve_model_dir(str(repo))
    assert served != repo and resolve_model_dir(str(repo)) == served  # built once
    assert json.loads((served / "config.json").read_text()) == json.loads(
        (full / "config.json").read_text())
    prompts = _prompts(3, seed=9)
    engine = Engine(EngineConfig(model_id=str(repo), max_input_tokens=100,
                                 max_total_tokens=200, block_size=4), served)
    seqs = [_greedy(i, p, 12) for i, p in enumerate(prompts)]
    _run(engine, seqs)
    assert [s.output_ids for s in seqs] == [_hf_greedy(hf, p, 12) for p in prompts]
    stats = engine.stats()
    assert stats.speculation_method == "medusa" and stats.speculation_draft_tokens >= 3 * 3 * 5
    plain = Engine(EngineConfig(model_id=str(model_dir)), model_dir)
    assert plain.stats().speculation_method == ""  # no heads, no --speculate: none


def test_rows_with_a_grammar_take_drafts_and_keep_their_outputs(model_dir, monkeypatch):
    """Drafts for constrained rows (greedy and seeded sampling): each draft row is masked by
    the grammar as it stands after the drafts before it, and drafts the grammar forbids are
    never verified; outputs equal those without drafts, some drafts accepted."""
    from textgen_backend.sampling.grammar import grammar_from_request

    constraints = [{"guided_regex": r"[0-9]{3}-[a-z]{2,4}-[0-9]{2}"},
                   {"guided_choice": ["alpha beta gamma", "delta epsilon"]},
                   {"guided_json": {"type": "object", "properties": {
                       "name": {"type": "string"}, "n": {"type": "integer"}},
                       "required": ["name", "n"]}}]
    prompts = _prompts(len(constraints) * 2, seed=5)

    def run(speculate):
        engine = _engine(model_dir, speculate=speculate)
        seqs = [Sequence(i, p, SamplingParams(**({"do_sample": True, "temperature": 0.8,
                                                    "seed": i} if i % 2 else {})),
                         StoppingParams(max_tokens=30),
                         grammar=grammar_from_request(dict(constraints[i // 2]), True))
                for i, p in enumerate(prompts)]
        _run(engine, seqs)
        return [s.output_ids for s in seqs], engine.stats()

    plain, _ = run(0)
    drafts_seen = []
    oracle_drafts(monkeypatch, [p + out for p, out in zip(prompts, plain)])
    propose = speculator_module.propose_ngram

    def propose_and_spoil(histories, n):  # plus a token no grammar here allows
        drafts = [d + [0] * (n - len(d)) for d in propose(histories, n)]
        drafts_seen.extend(drafts)
        return drafts
    monkeypatch.setattr(speculator_module, "propose_ngram", propose_and_spoil)
    attach = speculator_module.Speculator.attach

    def attach_and_check(self, out):
        attach(self, out)
        for seq, drafts in zip(out.seqs, out.draft_ids or []):
            assert seq.matcher.validate_tokens(drafts) == len(drafts), "a forbidden draft"
    monkeypatch.setattr(speculator_module.Speculator, "attach", attach_and_check)
    drafted, stats = run(3)
    assert drafted == plain
    assert 0 < stats.speculation_accepted_tokens < stats.speculation_draft_tokens
    assert stats.speculation_draft_tokens < sum(len(d) for d in drafts_seen)  # some cut
