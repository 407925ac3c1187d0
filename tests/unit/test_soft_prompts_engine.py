"""The engine serves soft prompts (TGIS prompt tuning) per sequence: a batch mixing none, two
prefixes and a prefix with a LoRA adapter equals the reference row by row (float32, CPU), and
the prefix store refuses what it must."""
from __future__ import annotations

import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from loads import settle
from lora_adapters import ATTENTION, save_random_lora
from soft_prompts import (greedy_after_soft_prompt, peft_prompt_tuning_greedy, prompt_embeddings,
                          save_random_prompt_tuning)
from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.prompt_tuning.store import PrefixError, PrefixStore
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

PROMPTS = [[0, 5, 9, 42, 7], [0, 100, 3], [0, 17, 18, 19, 20], [0, 250, 251]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("soft-prompts")
    model_dir = build_tiny_model(root / "model", "llama")
    store = root / "store"
    save_random_prompt_tuning(model_dir, store / "four", 4, seed=1)
    save_random_prompt_tuning(model_dir, store / "team/seven", 7, seed=2)
    (store / "tgis").mkdir()
    torch.save(torch.randn(3, 64), store / "tgis" / "decoder.pt")  # TGIS's format
    save_random_lora(model_dir, root / "lora", 8, ATTENTION, seed=3)
    return model_dir, store, root / "lora"


def test_mixed_batch_equals_the_reference_row_by_row(setup):
    model_dir, store, lora_dir = setup
    config = EngineConfig(model_id=str(model_dir), prefix_store_path=str(store),
                          max_lora_rank=8, adapter_source="local")
    engine = Engine(config, model_dir)
    prefixes = PrefixStore(str(store), 64)
    adapter = AdapterCatalog(config, ModelConfig.from_dir(model_dir)).resolve(str(lora_dir),
                                                                              "local", "")
    plan = [(None, None), ("four", None), ("team/seven", None), ("tgis", None),
            ("four", adapter), (None, adapter)]
    seqs = [Sequence(i, PROMPTS[i % 4], SamplingParams(),
                     StoppingParams(max_tokens=10, ignore_eos=True), adapter=ref,
                     prefix=prefixes.resolve(prefix or ""))
            for i, (prefix, ref) in enumerate(plan)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with_lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_dir).eval()
    tgis = torch.load(store / "tgis" / "decoder.pt")
    embeddings = {None: None, "four": prompt_embeddings(store / "four"),
                  "team/seven": prompt_embeddings(store / "team/seven"), "tgis": tgis}
    for seq, (prefix, ref) in zip(seqs, plan):
        model = with_lora if ref else base
        expected = greedy_after_soft_prompt(model, embeddings[prefix], seq.prompt_ids, 10)
        assert seq.output_ids == expected, (prefix, ref)
    # the soft prompt changes the answer, and the reference is PEFT's own prompt tuning
    assert seqs[1].output_ids != greedy_after_soft_prompt(base, None, PROMPTS[1], 10)
    assert seqs[2].output_ids == peft_prompt_tuning_greedy(model_dir, store / "team/seven",
                                                           PROMPTS[2], 10)


def test_the_store_refuses_bad_ids_and_files(setup, tmp_path):
    model_dir, store, _ = setup
    (store / "wrong-shape").mkdir(exist_ok=True)
    torch.save(torch.randn(3, 65), store / "wrong-shape" / "decoder.pt")
    (store / "ints").mkdir(exist_ok=True)
    torch.save(torch.ones(3, 64, dtype=torch.int64), store / "ints" / "decoder.pt")
    (store / "empty").mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save(torch.randn(3, 64), outside / "decoder.pt")
    if not (store / "escape").exists():
        os.symlink(outside, store / "escape")
    prefixes = PrefixStore(str(store), 64)
    for prefix_id, words in [("../model", "not a valid id"), ("/etc", "not a valid id"),
                             ("a b", "not a valid id"), ("missing", "not found"),
                             ("escape", "leads out of the prefix store"),
                             ("wrong-shape", "expected [num_virtual_tokens, 64]"),
                             ("ints", "not floating point"), ("empty", "neither")]:
        with pytest.raises(PrefixError, match=re.escape(words)) as error:
            prefixes.resolve(prefix_id)
        assert repr(prefix_id) in str(error.value)
    with pytest.raises(PrefixError, match="no prefix store"):
        PrefixStore(None, 64).resolve("four")
    assert prefixes.resolve("team/seven").num_virtual_tokens == 7


def test_the_cache_loads_once_evicts_past_its_capacity_and_reports_failures(setup, tmp_path):
    from textgen_backend.prompt_tuning.cache import PromptCache

    _, store, _ = setup
    prefixes = PrefixStore(str(store), 64)
    four, seven = prefixes.resolve("four"), prefixes.resolve("team/seven")
    cache = PromptCache(capacity_bytes=8 * 64 * 4, dtype=torch.float32,
                        device=torch.device("cpu"))   # room for 8 virtual tokens
    assert not cache.ready(four)
    settle(cache.poll, lambda: cache._loading)
    assert cache.ready(four) and cache.ready(four)   # a hit is not a load
    assert torch.equal(cache.take(four), prompt_embeddings(store / "four"))
    assert not cache.ready(seven)
    settle(cache.poll, lambda: cache._loading)
    assert cache.ready(seven) and not cache.ready(four)   # 4 + 7 > 8: the older went
    settle(cache.poll, lambda: cache._loading)
    assert cache.counters.loads == 3 and len(cache.counters.load_seconds) == 3
    # a file that changed after its check fails to load, naming nothing else
    changed_dir = tmp_path / "changed"
    changed_dir.mkdir()
    torch.save(torch.randn(2, 64), changed_dir / "decoder.pt")
    changed = PrefixStore(str(tmp_path), 64).resolve("changed")
    torch.save(torch.randn(5, 64), changed_dir / "decoder.pt")
    assert not cache.ready(changed)
    failures = settle(cache.poll, lambda: cache._loading)
    assert [(ref.prefix_id, "changed since it was checked" in error)
            for ref, error in failures] == [("changed", True)]
    assert cache.counters.failures == 1
    cache.shutdown()


def test_the_prefix_cache_keeps_soft_prompts_and_adapters_apart(setup):
    """Sequences whose token ids match but whose soft prompt or adapter differ must not share
    cached KV: each one, run after the other is cached, still equals its reference."""
    model_dir, store, lora_dir = setup
    config = EngineConfig(model_id=str(model_dir), prefix_store_path=str(store), block_size=4,
                          max_lora_rank=8)
    engine = Engine(config, model_dir)
    adapter = AdapterCatalog(config, ModelConfig.from_dir(model_dir)).resolve(str(lora_dir),
                                                                              "local", "")
    four = PrefixStore(str(store), 64).resolve("four")
    prompt = list(range(30, 45))
    # the soft prompt's virtual tokens are placeholder ids 0: the same ids as this prompt
    plan = [dict(prefix=four), dict(), dict(adapter=adapter), dict(), dict()]
    prompts = [prompt, [0] * 4 + prompt, prompt, prompt, prompt]
    seqs = []
    for i, (kw, ids) in enumerate(zip(plan, prompts)):
        seqs.append(Sequence(i, ids, SamplingParams(),
                             StoppingParams(max_tokens=8, ignore_eos=True), **kw))
        engine.add(seqs[-1])
        while engine.has_work():
            engine.step()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with_lora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_dir).eval()
    embeddings = prompt_embeddings(store / "four")
    assert seqs[0].output_ids == greedy_after_soft_prompt(base, embeddings, prompt, 8)
    assert seqs[1].output_ids == greedy_after_soft_prompt(base, None, [0] * 4 + prompt, 8)
    assert seqs[2].output_ids == greedy_after_soft_prompt(with_lora, None, prompt, 8)
    assert seqs[3].output_ids == greedy_after_soft_prompt(base, None, prompt, 8)
    # the last one, a repeat of the fourth, reused its first 3 blocks (12 of its 15 tokens)
    assert seqs[4].output_ids == seqs[3].output_ids
    assert engine.stats().prefix_cache_hit_tokens == 12


def test_a_soft_prompt_retrained_in_place_is_served_anew(setup, tmp_path):
    """Same id, new weights: neither the prompt cache's old embeddings nor the prefix cache's
    KV of the old ones are served."""
    import os

    model_dir, _, _ = setup
    config = EngineConfig(model_id=str(model_dir), prefix_store_path=str(tmp_path),
                          block_size=4)
    engine = Engine(config, model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt, outputs, expected = list(range(30, 45)), [], []
    for seq_id, seed in enumerate((1, 2)):
        saved = save_random_prompt_tuning(model_dir, tmp_path / "p", 4, seed=seed)
        later = 1_000_000 + 10 * seq_id  # distinct whatever the file system's mtime grain
        for path in saved.rglob("*"):
            os.utime(path, (later, later))
        seq = Sequence(seq_id, prompt, SamplingParams(),
                       StoppingParams(max_tokens=8, ignore_eos=True),
                       prefix=PrefixStore(str(tmp_path), 64).resolve("p"))
        engine.add(seq)
        while engine.has_work():
            for out in engine.step():
                assert out.error is None, out.error
        outputs.append(seq.output_ids)
        expected.append(greedy_after_soft_prompt(base, prompt_embeddings(saved), prompt, 8))
    assert expected[0] != expected[1]
    assert outputs == expected
