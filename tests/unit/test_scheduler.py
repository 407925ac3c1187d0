import pytest

from textgen_backend.engine.block_manager import BlockManager
from textgen_backend.config import EngineLimits
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.sampling.sampler import SampleOutput
from textgen_backend.engine.scheduler import Scheduler
from textgen_backend.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.unit


def limits(**overrides):
    values = dict(max_input_tokens=64, max_total_tokens=96, max_batch_prefill_tokens=64,
                  num_kv_blocks=32, block_size=4, max_batch_size=None, max_waiting_tokens=20,
                  waiting_served_ratio=0.3)
    values.update(overrides)
    return EngineLimits(**values)


def make_scheduler(**overrides):
    """The batching policy alone: the prompts here share prefixes, so the prefix cache is off
    (tests/unit/test_prefix_cache.py covers it)."""
    lim = limits(**overrides)
    return Scheduler(lim, BlockManager(lim.num_kv_blocks, lim.block_size, caching=False),
                     eos_token_ids=(1,))


def seq(seq_id, prompt_len, max_tokens=50):
    return Sequence(seq_id, list(range(2, 2 + prompt_len)), SamplingParams(),
                    StoppingParams(max_tokens=max_tokens))


def run_step(scheduler, token=7):
    out = scheduler.schedule()
    assert out is not None
    sampled = SampleOutput([token] * len(out.seqs))  # read before the next step is scheduled
    return out, scheduler.resolve(out, scheduler.advance(out), sampled)


def test_block_manager_allocates_ceil_blocks_and_appends_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(1, prompt_len=5)
    bm.allocate(s)
    assert len(s.block_ids) == 2 and bm.num_free_blocks == 2
    s.output_ids += [9, 9, 9]           # 8 tokens: still 2 blocks
    bm.append_slot(s)
    assert len(s.block_ids) == 2
    s.output_ids.append(9)              # 9 tokens: a third block
    bm.append_slot(s)
    assert len(s.block_ids) == 3 and bm.num_free_blocks == 1
    bm.free(s)
    assert s.block_ids == [] and bm.num_free_blocks == 4


def test_prefill_respects_token_budget_but_admits_a_lone_long_sequence():
    sched = make_scheduler(max_batch_prefill_tokens=10)
    for i, n in enumerate([6, 6, 3]):
        sched.add(seq(i, n))
    out = sched.schedule()
    assert out.is_prefill and [s.seq_id for s in out.seqs] == [0]  # 6 + 6 > 10: stop in order
    sched2 = make_scheduler(max_batch_prefill_tokens=10)
    sched2.add(seq(0, 20))              # longer than the budget (a recomputed sequence)
    assert [s.seq_id for s in sched2.schedule().seqs] == [0]


def test_waiting_served_ratio_and_max_waiting_tokens():
    sched = make_scheduler(waiting_served_ratio=1.0, max_waiting_tokens=3, num_kv_blocks=64)
    for i in range(4):
        sched.add(seq(i, 3))
    run_step(sched)                     # prefill of all 4
    sched.add(seq(10, 3))               # 1 waiting < 1.0 x 4 running: keep decoding...
    kinds = [run_step(sched)[0].is_prefill for _ in range(4)]
    assert kinds == [False, False, False, True]  # ...until 3 decode steps have passed
    assert len(sched.running) == 5


def test_max_batch_size_caps_the_running_batch():
    sched = make_scheduler(max_batch_size=2)
    for i in range(3):
        sched.add(seq(i, 2))
    out, _ = run_step(sched)
    assert len(out.seqs) == 2 and len(sched.waiting) == 1
    for _ in range(5):
        out, _ = run_step(sched)
        assert len(out.seqs) <= 2


def test_decode_preempts_newest_and_recomputes_it_later():
    # 6 blocks of 4 tokens; two sequences of 8-token prompts take 2 blocks (+ room for one).
    sched = make_scheduler(num_kv_blocks=6, max_total_tokens=24)
    a, b = seq(1, 8, max_tokens=12), seq(2, 8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    run_step(sched)                     # prefill both: 4 blocks used
    assert sched.block_manager.num_free_blocks == 2
    preempted_at = None
    for step in range(30):
        out, outputs = run_step(sched)
        if b.status is SequenceStatus.WAITING and preempted_at is None:
            preempted_at = step
            assert b.block_ids == [] and b.num_preemptions == 1
            assert sched.waiting[0] is b     # front of the queue
        if a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED:
            break
    assert preempted_at is not None, "the KV budget should have forced a preemption"
    assert sched.num_preemptions >= 1
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_ids) == len(b.output_ids) == 12
    assert sched.block_manager.num_free_blocks == 6


def test_eos_and_max_tokens_finish_and_free_blocks():
    sched = make_scheduler()
    s = seq(1, 3, max_tokens=5)
    sched.add(s)
    _, outputs = run_step(sched, token=1)   # EOS at once
    assert outputs[0].finish_reason == "eos_token" and s.status is SequenceStatus.FINISHED
    assert sched.block_manager.num_free_blocks == 32
    s2 = Sequence(2, [2, 3], SamplingParams(), StoppingParams(max_tokens=3, ignore_eos=True))
    sched.add(s2)
    reasons = [run_step(sched, token=1)[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, "length"]


def test_abort_frees_waiting_and_running_sequences():
    sched = make_scheduler(max_batch_size=1)
    a, b = seq(1, 4), seq(2, 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert sched.abort(2, "cancelled").finish_reason == "cancelled"   # waiting
    assert sched.abort(1, "cancelled").finish_reason == "cancelled"   # running
    assert sched.abort(3, "cancelled") is None
    assert not sched.has_work() and sched.block_manager.num_free_blocks == 32


def test_prefill_limit_hits_and_first_admission_times_are_recorded():
    sched = make_scheduler(max_batch_prefill_tokens=10)
    first, second = seq(0, 6), seq(1, 6)
    sched.add(first)
    sched.add(second)
    assert first.scheduled_at is None
    run_step(sched)                     # 6 + 6 > 10: the second one waits
    assert sched.num_prefill_limit_hits == 1 and second.scheduled_at is None
    admitted_at = first.scheduled_at
    assert admitted_at is not None
    sched._preempt(first)               # a recomputed sequence keeps its first admission time
    run_step(sched)                     # 7 + 6 > 10 again
    assert first.status is SequenceStatus.RUNNING and first.scheduled_at == admitted_at
    assert sched.num_prefill_limit_hits == 2 and second.scheduled_at is None
    out, _ = run_step(sched)
    assert out.is_prefill and out.seqs == [second] and second.scheduled_at >= admitted_at
