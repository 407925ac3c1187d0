"""The prefix cache: the block hash chain, sharing and reference counts, the reuse order of
free blocks, and an engine whose outputs are the same with the cache on and off."""
from __future__ import annotations

import random

import pytest

from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.config import EngineConfig
from textgen_backend.engine.block_manager import BlockManager, block_hash
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


def seq(seq_id, tokens, **kw):
    return Sequence(seq_id, list(tokens), SamplingParams(), StoppingParams(max_tokens=50), **kw)


def prefilled(bm, s, sampled=99):
    """s admitted and prefilled: its sampled token appended, its full blocks committed."""
    bm.allocate(s)
    s.num_computed_tokens = s.num_tokens
    s.output_ids.append(sampled)
    bm.commit(s)
    return s


def test_the_hash_chain_depends_on_parent_tokens_and_extra_keys():
    first = block_hash(b"", [1, 2, 3, 4], "")
    assert first == block_hash(b"", [1, 2, 3, 4], "")
    assert first != block_hash(b"", [1, 2, 3, 5], "")
    assert block_hash(first, [5, 6, 7, 8], "") != block_hash(b"", [5, 6, 7, 8], "")
    assert first != block_hash(b"", [1, 2, 3, 4], "adapter")


def test_shared_prefixes_share_blocks_and_counts_stay_right():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = prefilled(bm, seq(1, range(10)))        # 11 tokens: blocks 0-1 full and registered
    assert bm.num_cached_blocks == 2
    b = seq(2, list(range(8)) + [50, 51, 52])   # the same 8 first tokens
    assert bm.cached_prefix(b) == a.block_ids[:2]
    bm.allocate(b)
    assert b.block_ids[:2] == a.block_ids[:2] and b.num_cached_tokens == 8
    assert b.block_ids[2] not in a.block_ids
    assert (bm.query_tokens, bm.hit_tokens) == (10 + 11, 8)
    bm.free(a)                                   # b still holds the shared blocks
    assert bm.num_free_blocks == 8 - 3 and all(block not in bm._free for block in b.block_ids)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2   # freed, still cached
    # a whole prompt in the cache still computes its last token (its logits are needed)
    c = seq(3, range(8))
    assert len(bm.cached_prefix(c)) == 1


def test_free_blocks_are_reused_unhashed_first_then_a_chains_tail_before_its_head():
    bm = BlockManager(num_blocks=5, block_size=2)
    a = prefilled(bm, seq(1, range(7)))          # 8 tokens, 7 computed: 3 full blocks, 1 partial
    head, middle, tail, partial = a.block_ids
    never_used = next(iter(bm._free))
    bm.free(a)
    assert bm.num_cached_blocks == 3
    order = [bm._take_free() for _ in range(5)]
    assert order == [partial, never_used, tail, middle, head]
    assert bm.evictions == 3 and bm.num_cached_blocks == 0


def test_adapters_soft_prompts_and_prompt_details_do_not_share():
    bm = BlockManager(num_blocks=16, block_size=4)
    prefilled(bm, seq(1, range(9)))
    lora = AdapterRef("sql", ("/adapters/sql",))
    assert bm.cached_prefix(seq(2, range(9), adapter=lora)) == []
    assert len(bm.cached_prefix(seq(3, range(9)))) == 2
    details = seq(4, range(9), details=DetailsParams(input_details=True))
    assert bm.cached_prefix(details) == []      # every prompt position must be computed
    assert BlockManager(16, 4, caching=False).cached_prefix(seq(5, range(9))) == []


def test_the_engine_answers_the_same_with_the_cache_on_and_off(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    rng = random.Random(0)
    system = [rng.randrange(2, 400) for _ in range(37)]   # shared, not block-aligned
    prompts = [system[:rng.choice([5, 16, 33, 37])] + [rng.randrange(2, 400)
                                                        for _ in range(rng.randrange(1, 20))]
               for _ in range(24)]
    prompts += [p[:] for p in prompts[:6]]                  # repeats: whole prompts cached
    outputs = {}
    for caching in (False, True):
        # 30 sequences of up to 60 + 12 tokens in 40 blocks of 4: preemption and eviction
        engine = Engine(EngineConfig(model_id=str(model_dir), prefix_caching=caching,
                                     block_size=4, max_batch_total_tokens=160,
                                     max_total_tokens=160, max_input_tokens=100), model_dir)
        seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=12, ignore_eos=True))
                for i, p in enumerate(prompts)]
        for i, s in enumerate(seqs):
            engine.add(s)
            if i % 5 == 4:
                engine.step()
        while engine.has_work():
            engine.step()
        outputs[caching] = [s.output_ids for s in seqs]
        stats = engine.stats()
        assert stats.kv_blocks_used == 0
        if caching:
            assert stats.prefix_cache_hit_tokens > 0 and stats.num_preemptions > 0
            assert stats.prefix_cache_evictions > 0
    assert outputs[True] == outputs[False]


def test_a_readmitted_sequence_keeps_the_cache_hit_of_its_first_admission():
    """num_cached_tokens is the request's hit; after a preemption the sequence finds its own
    committed blocks again, which computes less but was no hit of the request's."""
    bm = BlockManager(num_blocks=8, block_size=4)
    s = prefilled(bm, seq(1, range(10)))
    assert s.num_cached_tokens == 0
    s.scheduled_at = 1.0          # admitted (the scheduler's mark)
    bm.free(s)                    # preempted
    s.num_computed_tokens = 0
    bm.allocate(s)
    assert s.num_computed_tokens == 8 and s.num_cached_tokens == 0
    assert bm.hit_tokens == 8     # the metric counts what each admission found


def test_cancelling_a_sequence_that_shares_cached_blocks_leaves_the_others_exact(tmp_path):
    """Three sequences share a 16-token prefix's blocks; the middle one is cancelled while
    decoding: the others finish as alone, every block comes back, the prefix stays cached."""
    model_dir = build_tiny_model(tmp_path / "model", "llama")
    shared = list(range(40, 56))
    prompts = [shared + [7, 8], shared + [9], shared + [10, 11, 12]]

    def engine():
        return Engine(EngineConfig(model_id=str(model_dir), block_size=4), model_dir)

    alone = []
    for prompt in prompts:
        e = engine()
        s = seq(0, prompt)
        e.add(s)
        while e.has_work():
            e.step()
        alone.append(s.output_ids)
    e = engine()
    first = seq(0, prompts[0])
    e.add(first)
    e.step()                                # its prefix is cached once its prefill commits
    seqs = [first, seq(1, prompts[1]), seq(2, prompts[2])]
    for s in seqs[1:]:
        e.add(s)
    for _ in range(6):
        e.step()
    assert e.stats().prefix_cache_hit_tokens >= 2 * 16 and seqs[1].output_ids
    e.abort(1, "cancelled")
    while e.has_work():
        e.step()
    assert [seqs[0].output_ids, seqs[2].output_ids] == [alone[0], alone[2]]
    stats = e.stats()
    assert stats.kv_blocks_used == 0 and stats.prefix_cache_blocks >= 4
