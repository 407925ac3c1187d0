"""The engine in-process against transformers: greedy float32 parity for each model family,
continuous batching with preemption, and seeded sampling independent of the batch."""
import pytest
import torch

from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.engine.sequence import Sequence
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit

PROMPTS = [[5, 17, 42, 9, 11], [3, 4], list(range(20, 60)), [7] * 9, [300, 12, 250]]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return model_dir, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference(hf_model, prompt, max_new_tokens):
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                            do_sample=False)
    return out[0, len(prompt):].tolist()


def run(engine, seqs):
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()


def greedy_seqs(max_tokens=24):
    return [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=max_tokens))
            for i, p in enumerate(PROMPTS)]


def test_greedy_parity_with_transformers_under_preemption(family):
    model_dir, hf_model = family
    # 16 blocks of 4 tokens cannot hold all five sequences: some get preempted and recomputed.
    config = EngineConfig(model_id=str(model_dir), block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=64)
    engine = Engine(config, model_dir)
    for k_cache, v_cache in engine.runner.kv_caches:  # unwritten slots must never be read
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    seqs = greedy_seqs()
    run(engine, seqs)
    assert engine.scheduler.num_preemptions > 0
    for s in seqs:
        assert s.output_ids == reference(hf_model, s.prompt_ids, 24), s.prompt_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(family):
    model_dir, _ = family
    engine = Engine(EngineConfig(model_id=str(model_dir)), model_dir)
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=1234)

    def sampled(seq_id, others):
        target = Sequence(seq_id, PROMPTS[0], params, StoppingParams(max_tokens=16))
        run(engine, [target] + [Sequence(seq_id + 1 + i, p, SamplingParams(do_sample=True, seed=i),
                                         StoppingParams(max_tokens=16))
                                for i, p in enumerate(others)])
        return target.output_ids

    alone = sampled(100, [])
    assert sampled(200, PROMPTS[1:]) == alone
    assert alone != reference(family[1], PROMPTS[0], 16)  # it did sample
    other_seed = Sequence(300, PROMPTS[0], SamplingParams(do_sample=True, temperature=1.5,
                                                          top_k=50, top_p=0.95, seed=99),
                          StoppingParams(max_tokens=16))
    run(engine, [other_seed])
    assert other_seed.output_ids != alone


def test_mixed_parameters_in_a_batch_give_each_request_its_output_alone(family):
    """Issue 10: a length penalty on one request turned another's banned EOS into NaN, which
    greedy argmax chose (an EOS before min_tokens)."""
    model_dir, _ = family
    engine = Engine(EngineConfig(model_id=str(model_dir)), model_dir)
    requests = [
        (SamplingParams(length_penalty=(2, 1.5)), StoppingParams(max_tokens=12)),
        (SamplingParams(), StoppingParams(max_tokens=12, min_tokens=8)),
        (SamplingParams(length_penalty=(0, 1.2)), StoppingParams(max_tokens=12, min_tokens=9)),
        (SamplingParams(length_penalty=(0, 1.0)), StoppingParams(max_tokens=12, min_tokens=4)),
        (SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05,
                        repetition_penalty=1.3, frequency_penalty=0.5, bad_words_ids=((1,),),
                        watermark=True, seed=7), StoppingParams(max_tokens=12, min_tokens=3)),
    ]

    def outputs(first_id, batch):
        seqs = [Sequence(first_id + i, PROMPTS[i], sampling, stopping)
                for i, (sampling, stopping) in batch]
        run(engine, seqs)
        return [s.output_ids for s in seqs]

    together = outputs(0, list(enumerate(requests)))
    assert together == [outputs(100 * (i + 1), [(i, r)])[0] for i, r in enumerate(requests)]
    for output, (_, stopping) in zip(together, requests):
        assert len(output) >= stopping.min_tokens
