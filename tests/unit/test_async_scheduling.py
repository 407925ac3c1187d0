"""Async scheduling (engine/async_steps.py): a step launched before the previous one's tokens are
read gives every sequence the same tokens, logprobs and finish reasons as steps read one by one,
through arrivals, chunked prefill, the prefix cache, preemption, EOS, max_tokens, cancellations,
penalties and parameters that turn it off while they run; a step launched ahead that fails is recovered
(engine on the CPU, tiny model, float32)."""
from __future__ import annotations

import random
from collections import defaultdict

import pytest

from textgen_backend.config import EngineConfig
from textgen_backend.engine import async_steps
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.speculation import speculator
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("async") / "model", "llama")


def _engine(model_dir, async_scheduling: bool, eos: frozenset[int], **overrides) -> Engine:
    config = dict(model_id=str(model_dir), dtype="float32", block_size=4, max_input_tokens=60,
                  max_total_tokens=100, max_batch_prefill_tokens=24, max_batch_total_tokens=400,
                  async_scheduling=async_scheduling)
    engine = Engine(EngineConfig(**{**config, **overrides}), model_dir)
    # tokens the tiny model does produce end sequences too (its own EOS is all but never chosen)
    engine.scheduler.eos_token_ids = eos
    engine.runner.eos_token_ids = tuple(sorted(eos))
    return engine


def _workload() -> list[tuple[int, Sequence, int | None]]:
    """(arrival step, sequence, cancel after this many tokens or None): mixed parameters, shared
    prefixes, prompts longer than the chunk budget."""
    rng = random.Random(7)
    system = [rng.randrange(2, 400) for _ in range(18)]
    kinds = [
        (SamplingParams(), DetailsParams()),
        (SamplingParams(do_sample=True, temperature=0.8, top_k=30, seed=11), DetailsParams()),
        (SamplingParams(do_sample=True, top_p=0.9, seed=5), DetailsParams(log_probs=True,
                                                                          top_n_tokens=3)),
        (SamplingParams(length_penalty=(2, 1.5)), DetailsParams(log_probs=True)),
        (SamplingParams(bad_words_ids=((7,), (9,))), DetailsParams()),   # one-token words
    ]
    work = []
    for i in range(24):
        sampling, details = kinds[i % len(kinds)]
        if i in (9, 17):  # penalties: their counts take the pending token on the device
            sampling = SamplingParams(repetition_penalty=1.3, frequency_penalty=1.5)
        if i == 21:  # a watermark: no step is launched ahead while it runs
            sampling = SamplingParams(watermark=True)
        prompt = (system if i % 3 == 0 else []) + [rng.randrange(2, 400)
                                                   for _ in range(rng.randrange(3, 40))]
        if i in (9, 17):  # prefilled in one step beside decode rows whose tokens are pending
            prompt = prompt[-6:]
        stopping = StoppingParams(max_tokens=rng.randrange(4, 30), ignore_eos=i % 4 == 0,
                                  min_tokens=3 if i % 5 == 2 else 0)
        seq = Sequence(i, prompt, sampling, stopping, details=details,
                       track_logprobs=details.per_token)
        work.append((rng.randrange(0, 40), seq, 5 if i % 7 == 3 else None))
    return work


def _run(engine: Engine, work) -> dict[int, dict]:
    """Runs the workload, adding each sequence at its step; {seq_id: what it produced}."""
    results: dict[int, dict] = defaultdict(lambda: {"tokens": [], "finish": None, "logprobs": []})
    arrivals = defaultdict(list)
    for at, seq, cancel in work:
        arrivals[at].append((seq, cancel))
    cancels = {}
    step = 0
    while arrivals or engine.has_work():
        for seq, cancel in arrivals.pop(step, []):
            engine.add(Sequence(seq.seq_id, list(seq.prompt_ids), seq.sampling, seq.stopping,
                                details=seq.details, track_logprobs=seq.track_logprobs))
            cancels[seq.seq_id] = cancel
        for out in engine.step():
            got = results[out.seq_id]
            assert got["finish"] is None, f"sequence {out.seq_id} got news after it finished"
            got["tokens"] += out.new_token_ids
            got["logprobs"] += [(lp.logprob, lp.rank, [t for t, _ in lp.top])
                                for lp in out.logprobs or []]
            got["finish"] = out.finish_reason
            cancel = cancels[out.seq_id]
            if cancel is not None and not out.finish_reason and len(got["tokens"]) >= cancel:
                engine.abort(out.seq_id, "cancelled")
        step += 1
    assert engine.stats().kv_blocks_used == 0
    return dict(results)


def _assert_same(got: dict, expected: dict) -> None:
    """Tokens and finish reasons exactly; logprobs within float32 noise (rows batched with
    other rows in a step)."""
    assert got.keys() == expected.keys()
    for seq_id, want in expected.items():
        have = got[seq_id]
        assert (have["tokens"], have["finish"]) == (want["tokens"], want["finish"]), seq_id
        assert [(r, top) for _, r, top in have["logprobs"]] == \
            [(r, top) for _, r, top in want["logprobs"]], seq_id
        assert [lp for lp, _, _ in have["logprobs"]] == pytest.approx(
            [lp for lp, _, _ in want["logprobs"]], abs=1e-4), seq_id


def _eos(model_dir) -> frozenset[int]:
    """EOS ids that end some sequences early: tokens greedy decoding of one prompt produces."""
    engine = _engine(model_dir, False, frozenset({1}))
    probe = Sequence(0, [11, 12, 13], SamplingParams(), StoppingParams(max_tokens=12))
    engine.add(probe)
    while engine.has_work():
        engine.step()
    return frozenset({1, probe.output_ids[6], probe.output_ids[10]})


@pytest.mark.parametrize("overrides", [
    {},                                                          # chunked prefill, prefix cache
    {"max_batch_total_tokens": 160},                             # preemption
    {"chunked_prefill": False, "max_batch_prefill_tokens": 70},  # TGI's separate prefills
])
def test_outputs_equal_steps_read_one_by_one(model_dir, monkeypatch, overrides):
    eos = _eos(model_dir)
    expected = _run(_engine(model_dir, False, eos, **overrides), _workload())
    fed = []
    values = async_steps.TokenFeed.values
    monkeypatch.setattr(async_steps.TokenFeed, "values",
                        lambda self, sampled: fed.append(len(self.rows)) or values(self, sampled))
    engine = _engine(model_dir, True, eos, **overrides)
    got = _run(engine, _workload())
    _assert_same(got, expected)
    finishes = {r["finish"] for r in got.values()}
    assert {"eos_token", "length", "cancelled"} <= finishes
    assert len(fed) > 20 and sum(fed) > 80  # steps were launched ahead, fed from the device
    if "max_batch_total_tokens" in overrides:
        assert engine.stats().num_preemptions > 0


def test_penalties_count_the_pending_token(model_dir):
    """Penalized sequences decoding in steps launched ahead: each step's penalty counts take the
    token still pending from the step before (on the device), as steps read one by one do."""
    def seqs():
        penalties = [SamplingParams(repetition_penalty=1.5), SamplingParams(frequency_penalty=2.0),
                     SamplingParams(presence_penalty=2.0, do_sample=True, seed=3), SamplingParams()]
        return [(0, Sequence(i, [7, 8, 7, 8, 7][:2 + i], params,
                             StoppingParams(max_tokens=40, ignore_eos=True)), None)
                for i, params in enumerate(penalties)]

    expected = _run(_engine(model_dir, False, frozenset({1})), seqs())
    fed = []
    engine = _engine(model_dir, True, frozenset({1}))
    launch = engine._launch
    engine._launch = lambda previous=None: fed.append(previous is not None) or launch(previous)
    _assert_same(_run(engine, seqs()), expected)
    assert sum(fed) > 30


def test_a_watermark_keeps_steps_one_at_a_time(model_dir, monkeypatch):
    """While a running sequence's sampling reads its previous token on the host (the
    watermark's green list), no step is launched ahead."""
    engine = _engine(model_dir, True, frozenset({1}))
    launched_ahead = []
    launch = engine._launch
    monkeypatch.setattr(engine, "_launch", lambda previous=None: (
        launched_ahead.append(previous is not None) or launch(previous)))
    engine.add(Sequence(1, [5, 6, 7], SamplingParams(watermark=True),
                        StoppingParams(max_tokens=10, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    assert launched_ahead and not any(launched_ahead)
    engine.add(Sequence(2, [5, 6, 7], SamplingParams(repetition_penalty=1.2),
                        StoppingParams(max_tokens=10, ignore_eos=True)))
    while engine.has_work():
        engine.step()
    assert any(launched_ahead)  # penalties count the pending token on the device


@pytest.mark.parametrize("fault", ["raise@9", "raise@20", "raise@33"])
def test_a_failed_step_launched_ahead_fails_only_its_live_sequences(model_dir, monkeypatch,
                                                                    fault):
    """Its sequences that the step before it finished (EOS) keep their final output; the
    others get the error; the rest of the workload is unaffected."""
    eos = _eos(model_dir)
    expected = _run(_engine(model_dir, False, eos), _workload())
    monkeypatch.setenv("TEXTGEN_FAULT_INJECTION", fault)
    got = _run(_engine(model_dir, True, eos), _workload())
    failed = {i for i, r in got.items() if r["finish"] == "error"}
    assert failed
    for seq_id, want in expected.items():
        have = got[seq_id]
        if seq_id in failed:
            assert have["tokens"] == want["tokens"][:len(have["tokens"])]
        else:
            assert (have["tokens"], have["finish"]) == (want["tokens"], want["finish"])


@pytest.mark.parametrize("fault", ["oom@3", "raise@4"])
def test_a_step_launched_ahead_that_fails_is_recovered(model_dir, monkeypatch, fault):
    """The third / fourth forward is a step launched ahead: out of memory, half its sequences
    wait and are recomputed (outputs unchanged); an error fails exactly its sequences."""
    def seqs():
        return [Sequence(i, [5 + i, 6, 7], SamplingParams(),
                         StoppingParams(max_tokens=12, ignore_eos=True)) for i in range(4)]

    expected = _run(_engine(model_dir, False, frozenset({1})), [(0, s, None) for s in seqs()])
    monkeypatch.setenv("TEXTGEN_FAULT_INJECTION", fault)
    engine = _engine(model_dir, True, frozenset({1}))
    got = _run(engine, [(0, s, None) for s in seqs()])
    if fault.startswith("oom"):
        _assert_same(got, expected)
        assert engine.scheduler.num_preemptions == 2
    else:
        assert all(r["finish"] == "error" for r in got.values())
        assert all(r["tokens"] == expected[i]["tokens"][:len(r["tokens"])]
                   for i, r in got.items())


@pytest.mark.parametrize("max_batch_size", [5, 8])
def test_speculation_above_its_batch_size_launches_steps_ahead(model_dir, monkeypatch,
                                                               max_batch_size):
    """With --speculate, steps of more sequences than --speculation-max-batch-size get no drafts
    and are launched ahead; smaller ones get drafts and are launched one at a time, and so is
    the step after one with drafts (how many are accepted is unknown until it is read); the
    outputs equal those of steps read one by one."""
    eos = _eos(model_dir)
    spec = {"speculate": 3, "speculation_max_batch_size": max_batch_size}
    expected = _run(_engine(model_dir, False, eos, **spec), _workload())
    engine = _engine(model_dir, True, eos, **spec)
    ahead, drafted = [], []
    launch, attach = engine._launch, engine.speculator.attach
    monkeypatch.setattr(engine, "_launch", lambda previous=None: (
        ahead.append(previous is not None) or launch(previous)))
    monkeypatch.setattr(engine.speculator, "attach", lambda out: (
        attach(out) or drafted.append(out.draft_ids is not None)))
    _assert_same(_run(engine, _workload()), expected)
    assert sum(ahead) > 2 and sum(drafted) > 5
    assert engine.speculator.counters.accepted_tokens > 0


def test_a_step_launched_ahead_gets_no_drafts(model_dir, monkeypatch):
    """More sequences run than --speculation-max-batch-size, so steps are launched ahead; when
    one of them stops decoding (max_tokens), a step launched ahead has fewer decoding rows than
    that size, but gets no drafts: they would be proposed without its newest tokens."""
    spec = {"speculate": 3, "speculation_max_batch_size": 1}
    # drafts for every row, as Medusa heads give (n-gram finds none after a pending token)
    monkeypatch.setattr(speculator, "propose_ngram",
                        lambda histories, n: [[5, 6, 7][:n] for _ in histories])

    def seqs():
        return [(0, Sequence(1, [5, 6, 7] * 4, SamplingParams(),
                             StoppingParams(max_tokens=30, ignore_eos=True)), None),
                (3, Sequence(2, list(range(100, 160)), SamplingParams(),
                             StoppingParams(max_tokens=5, ignore_eos=True)), None)]

    expected = _run(_engine(model_dir, False, frozenset({1}), **spec), seqs())
    engine = _engine(model_dir, True, frozenset({1}), **spec)
    launched = []  # (launched ahead, with drafts)
    launch = engine._launch

    def record(previous=None):
        flight = launch(previous)
        if flight is not None:
            launched.append((previous is not None, flight.scheduled.draft_ids is not None))
        return flight

    monkeypatch.setattr(engine, "_launch", record)
    _assert_same(_run(engine, seqs()), expected)
    assert (True, False) in launched and (False, True) in launched
    assert (True, True) not in launched
