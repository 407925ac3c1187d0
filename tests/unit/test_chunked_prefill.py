"""Chunked prefill: a prompt 5x the chunk size equals its unchunked answer, running sequences
get a token in every step while it is prefilled, and chunks compose with soft prompts, LoRA
adapters and the prefix cache (float32, CPU, against transformers / PEFT)."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_adapters import ATTENTION, PeftReference, save_random_lora
from soft_prompts import greedy_after_soft_prompt, prompt_embeddings, save_random_prompt_tuning
from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.prompt_tuning.store import PrefixStore
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit
CHUNK = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunked")
    model_dir = build_tiny_model(root / "model", "llama")
    save_random_prompt_tuning(model_dir, root / "store" / "seven", 7, seed=2)
    save_random_lora(model_dir, root / "lora", 8, ATTENTION, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, root, hf


def _engine(model_dir, root, **overrides):
    config = dict(model_id=str(model_dir), max_batch_prefill_tokens=CHUNK, max_input_tokens=120,
                  max_total_tokens=160, block_size=4, prefix_store_path=str(root / "store"),
                  max_lora_rank=8)
    return Engine(EngineConfig(**{**config, **overrides}), model_dir)


def _greedy(seq_id, prompt, tokens, **kw):
    return Sequence(seq_id, prompt, SamplingParams(),
                    StoppingParams(max_tokens=tokens, ignore_eos=True), **kw)


def test_a_long_prompt_is_chunked_while_a_stream_decodes_every_step(setup):
    model_dir, root, hf = setup
    rng = random.Random(0)
    long_prompt = [rng.randrange(2, 400) for _ in range(5 * CHUNK)]
    engine = _engine(model_dir, root, async_scheduling=False)  # last_step: the step launched
    stream = _greedy(1, [5, 6, 7], 40)
    engine.add(stream)
    engine.step()
    long = _greedy(2, long_prompt, 10)
    engine.add(long)
    chunks = []
    while not long.output_ids:
        before = len(stream.output_ids)
        engine.step()
        chunks.append(engine.last_step.num_tokens - 1)   # the stream's row is the other one
        assert len(stream.output_ids) == before + 1     # the stream never stalls
    assert chunks == [CHUNK] * 5
    while engine.has_work():
        engine.step()
    assert long.output_ids == greedy_after_soft_prompt(hf, None, long_prompt, 10)
    assert stream.output_ids == greedy_after_soft_prompt(hf, None, [5, 6, 7], 40)
    # unchunked, the same prompt gives the same answer
    whole = _engine(model_dir, root, chunked_prefill=False, max_batch_prefill_tokens=120)
    again = _greedy(3, long_prompt, 10)
    whole.add(again)
    while whole.has_work():
        whole.step()
    assert again.output_ids == long.output_ids


def test_chunks_compose_with_soft_prompts_adapters_details_and_the_cache(setup):
    model_dir, root, hf = setup
    engine = _engine(model_dir, root)
    seven = PrefixStore(str(root / "store"), 64).resolve("seven")
    config = EngineConfig(model_id=str(model_dir), max_lora_rank=8)
    lora = AdapterCatalog(config, ModelConfig.from_dir(model_dir)).resolve(str(root / "lora"),
                                                                           "local", "")
    rng = random.Random(1)
    prompt = [rng.randrange(2, 400) for _ in range(45)]
    filler = _greedy(0, prompt[:14], 8)           # leaves 2 of the first step's 16 tokens
    seqs = [_greedy(1, prompt, 8, prefix=seven),    # 4 cached + 2 + 1 of its 7 virtual tokens
            _greedy(2, prompt, 8, adapter=lora),
            _greedy(3, prompt, 8, details=DetailsParams(input_details=True)),
            _greedy(4, prompt, 8)]
    warm = _greedy(9, [1, 2], 1, prefix=seven)    # the soft prompt loaded before the test
    engine.add(warm)
    while engine.has_work():
        engine.step()
    for seq in [filler] + seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
    late = _greedy(5, prompt, 8)              # after the others: its prefix is cached
    engine.add(late)
    while engine.has_work():
        engine.step()
    embeddings = prompt_embeddings(root / "store" / "seven")
    assert seqs[0].output_ids == greedy_after_soft_prompt(hf, embeddings, prompt, 8)
    assert seqs[1].output_ids == PeftReference(model_dir).greedy(root / "lora", prompt, 8)
    assert seqs[2].output_ids == seqs[3].output_ids == late.output_ids == \
        greedy_after_soft_prompt(hf, None, prompt, 8)
    assert late.num_cached_tokens == 44
    assert engine.stats().kv_blocks_used == 0
