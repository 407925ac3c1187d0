"""LoRAX merges against plain-torch references of its rules (and PEFT's ties), and the adapter
residency rules (loading, LRU eviction, cycling, failures) with a scripted clock."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loads import settle
from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.adapters.merge import MergeParams, merge_adapters, merge_tensors
from textgen_backend.adapters.peft_format import (AdapterError, AdapterWeights, LoraConfig,
                                                  LoraPiece)
from textgen_backend.adapters.residency import AdapterResidency
from textgen_backend.models.llama import ProjectionTarget

pytestmark = pytest.mark.unit

TARGET = ProjectionTarget("self_attn.o_proj", 0, 6, 0, 5)


def _adapter(name, seed, rank=3, keys=((0, "o_proj"), (1, "o_proj"))):
    g = torch.Generator().manual_seed(seed)
    pieces = {key: LoraPiece(TARGET, torch.randn(rank, 5, generator=g),
                             torch.randn(6, rank, generator=g), 0.5 + seed) for key in keys}
    return AdapterWeights(name, LoraConfig(rank, 2.0 * rank, False), pieces)


def test_linear_merges_a_and_b_separately_with_the_first_adapters_scaling():
    a, b = _adapter("a", 1), _adapter("b", 2, keys=((0, "o_proj"),))
    merged = merge_adapters([a, b], MergeParams("linear", (0.7, 0.3)), "a+b")
    key = (0, "o_proj")
    assert torch.allclose(merged.pieces[key].a, 0.7 * a.pieces[key].a + 0.3 * b.pieces[key].a)
    assert torch.allclose(merged.pieces[key].b, 0.7 * a.pieces[key].b + 0.3 * b.pieces[key].b)
    assert merged.pieces[key].scaling == a.pieces[key].scaling
    # a projection only one adapter has is merged over that one (its weight alone)
    assert torch.allclose(merged.pieces[(1, "o_proj")].a, 0.7 * a.pieces[(1, "o_proj")].a)


def test_ties_equals_peft_ties():
    from peft.utils.merge_utils import ties

    tensors = [torch.randn(6, 5) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    for method in ("total", "frequency"):
        params = MergeParams("ties", tuple(weights), 0.4, method)
        ours = merge_tensors(tensors, weights, params, torch.Generator())
        assert torch.allclose(ours, ties(tensors, torch.tensor(weights), 0.4, method))


def test_dare_is_reproducible_with_a_seed_and_keeps_rescaled_elements():
    tensors = [torch.randn(40, 30) for _ in range(2)]
    params = MergeParams("dare_linear", (1.0, 0.0), 0.25, seed=7)
    first = merge_tensors(tensors, [1.0, 0.0], params, torch.Generator().manual_seed(7))
    again = merge_tensors(tensors, [1.0, 0.0], params, torch.Generator().manual_seed(7))
    other = merge_tensors(tensors, [1.0, 0.0], params, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    kept = first != 0
    assert torch.allclose(first[kept], tensors[0][kept] / 0.25)   # kept ones rescaled
    assert 0.15 < kept.float().mean() < 0.35                       # about `density` kept
    full = MergeParams("dare_ties", (1.0, 1.0), 1.0)
    assert torch.allclose(merge_tensors(tensors, [1.0, 1.0], full, torch.Generator()),
                          merge_tensors(tensors, [1.0, 1.0], MergeParams("ties", (1.0, 1.0), 1.0),
                                        torch.Generator()))


def test_merging_adapters_of_different_ranks_is_refused():
    with pytest.raises(AdapterError, match="one rank"):
        merge_adapters([_adapter("a", 1, rank=3), _adapter("b", 2, rank=4)],
                       MergeParams("linear", (1.0, 1.0)), "a+b")


class _Slots:
    def __init__(self, num_slots):
        self.num_slots, self.device, self.written = num_slots, torch.device("cpu"), {}

    def write(self, slot, weights):
        self.written[slot] = weights


def _ref(name):
    return AdapterRef(name, (f"/adapters/{name}",))


def test_loading_eviction_and_cycling():
    clock = [0.0]

    def load(ref):
        if ref.name == "broken":
            raise AdapterError("adapter 'broken': no adapter_model.safetensors")
        return SimpleNamespace(name=ref.name)

    slots = _Slots(2)
    residency = AdapterResidency(slots, load, cycle_seconds=2.0, clock=lambda: clock[0])
    a, b, c = _ref("a"), _ref("b"), _ref("c")
    assert not residency.ready(a) and not residency.ready(b)
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(a) and residency.ready(b)
    slot_a, slot_b = residency.acquire(a), residency.acquire(b)
    assert {slots.written[slot_a].name, slots.written[slot_b].name} == {"a", "b"}
    # both slots busy: c waits; no cycling before cycle_seconds
    assert not residency.ready(c)
    clock[0] = 1.0
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(a) and residency.ready(b) and not residency.ready(c)
    # after cycle_seconds one of them (both became resident at 0) yields
    clock[0] = 2.5
    settle(residency.poll, lambda: residency._loading)
    yielding = [r for r in (a, b) if not residency.ready(r)]
    assert len(yielding) == 1
    # it admits nothing new; once its running sequence ends, c takes its slot
    residency.release(yielding[0])
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(c) and slots.written[residency.acquire(c)].name == "c"
    assert residency.counters.evictions == 1 and residency.counters.loads == 3
    # the yielded adapter asked again (its sequences wait): first in line for the next slot,
    # which an idle adapter gives up once its running sequence ends
    other = a if yielding[0] is b else b
    clock[0] = 3.0
    residency.release(other)
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(yielding[0]) and residency.counters.evictions == 2
    # a failed load reports its adapter and frees its slot
    residency.release(c)
    assert not residency.ready(_ref("broken"))
    failures = settle(residency.poll, lambda: residency._loading)
    assert [(ref.name, "no adapter_model" in error) for ref, error in failures] == [
        ("broken", True)]
    assert residency.counters.failures == 1
    assert not residency.ready(_ref("e"))
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(_ref("e"))   # the freed slot was usable
    residency.shutdown()


def test_preloaded_adapters_leave_a_slot_for_the_others():
    """Preloaded adapters never leave: had they filled every slot, a request naming any other
    adapter would wait for one forever."""
    residency = AdapterResidency(_Slots(2), lambda ref: SimpleNamespace(name=ref.name), 2.0)
    residency.preload(_ref("pinned"))
    with pytest.raises(ValueError, match="at most 1, so that one slot stays for adapters "
                                         "loaded on demand"):
        residency.preload(_ref("second"))
    other = _ref("other")
    assert not residency.ready(other)
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(other) and residency.ready(_ref("pinned"))
    residency.shutdown()


def test_eviction_takes_the_least_recently_used_idle_adapter():
    clock = [0.0]
    slots = _Slots(3)
    residency = AdapterResidency(slots, lambda ref: SimpleNamespace(name=ref.name), 100.0,
                                 clock=lambda: clock[0])
    refs = {name: _ref(name) for name in "abcd"}
    for name in "abc":
        residency.ready(refs[name])
    settle(residency.poll, lambda: residency._loading)
    for name, used_at in (("b", 1.0), ("a", 2.0), ("c", 3.0)):  # b is the least recent
        clock[0] = used_at
        residency.acquire(refs[name])
        residency.release(refs[name])
    clock[0] = 4.0
    residency.poll()  # nobody asked for a, b or c since: all three are idle
    assert not residency.ready(refs["d"])
    settle(residency.poll, lambda: residency._loading)
    assert residency.ready(refs["d"])
    assert residency.ready(refs["a"]) and residency.ready(refs["c"])
    assert not residency.ready(refs["b"])
    residency.shutdown()
