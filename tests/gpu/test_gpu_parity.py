"""The engine on the GPU (Triton kernels, CUDA graphs) against transformers on the same GPU.

float32: token-exact greedy parity (our kernels compute float32 products exactly, as cuBLAS
does), over a batch wide enough for the largest decode graphs. bfloat16: implementations round
differently, so at the first mismatch each side's token must be among the other's top 5.
"""
import pytest
import torch

from textgen_backend.engine import async_steps, cuda_graphs
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.engine.sequence import Sequence
from draft_oracle import oracle_drafts
from greedy_parity import first_mismatch, record_top5
from tiny_models import build_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW_TOKENS = 40


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def model_dir(request, tmp_path_factory):
    # head_dim 128 and GQA 4 like Llama-3; Mistral's window (64) is shorter than the contexts.
    return build_tiny_model(tmp_path_factory.mktemp(request.param), request.param,
                            hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2,
                            initializer_range=0.05, sliding_window=64,
                            max_position_embeddings=1024)


def prompt_groups(vocab, per_group):
    """{prompt length: [prompts]}: equal lengths per group, so HF batches need no padding."""
    g = torch.Generator().manual_seed(0)
    return {n: torch.randint(2, vocab, (per_group, n), generator=g).tolist()
            for n in (1, 17, 130, 300, 700)}


def run_both(model_dir, dtype, per_group, monkeypatch):
    """Our engine on all prompts in one batch, then HF per group. Returns per prompt:
    (ours, our top-5 ids per step, theirs, their top-5 ids per step)."""
    from transformers import AutoModelForCausalLM

    recorded = record_top5(monkeypatch)
    engine = Engine(EngineConfig(model_id=str(model_dir), dtype=dtype,
                                 max_batch_total_tokens=200_000), model_dir)
    assert engine.runner.decode_graphs is not None, "CUDA graphs should be captured on the GPU"
    groups = prompt_groups(engine.model_config.vocab_size, per_group)
    seqs = {}
    for n, prompts in groups.items():
        for p in prompts:
            seqs[len(seqs)] = Sequence(len(seqs), p, SamplingParams(),
                                       StoppingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    for s in seqs.values():
        engine.add(s)
    while engine.has_work():
        engine.step()
    assert engine.scheduler.num_preemptions == 0
    del engine
    torch.cuda.empty_cache()

    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).cuda().eval()
    results, seq_id = [], 0
    for n, prompts in groups.items():
        out = hf.generate(torch.tensor(prompts, device="cuda"), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
        top5 = torch.stack(out.scores, dim=1).topk(5, dim=-1).indices.tolist()
        for row in range(len(prompts)):
            s = seqs[seq_id]
            results.append((s.output_ids, recorded[seq_id], out.sequences[row, n:].tolist(),
                            top5[row]))
            seq_id += 1
    return results


def test_float32_greedy_is_token_exact_at_large_batch(model_dir, monkeypatch):
    results = run_both(model_dir, "float32", per_group=30, monkeypatch=monkeypatch)  # 150 seqs
    exact = sum(first_mismatch(ours, theirs) is None for ours, _, theirs, _ in results)
    assert exact >= len(results) - 2, f"only {exact}/{len(results)} sequences are token-exact"
    for ours, our_top5, theirs, their_top5 in results:
        i = first_mismatch(ours, theirs)
        if i is not None:
            assert ours[i] in their_top5[i] and theirs[i] in our_top5[i]


def test_bfloat16_greedy_agrees_up_to_rounding(model_dir, monkeypatch):
    results = run_both(model_dir, "bfloat16", per_group=4, monkeypatch=monkeypatch)
    for ours, our_top5, theirs, their_top5 in results:
        i = first_mismatch(ours, theirs)
        if i is not None:
            assert ours[i] in their_top5[i], (i, ours[i], their_top5[i])
            assert theirs[i] in our_top5[i], (i, theirs[i], our_top5[i])


def _record_varlen_replays(monkeypatch) -> list:
    """The shapes of the varlen graphs replayed."""
    replays = []
    real_run = cuda_graphs.VarlenGraphs.run

    def run(self, arrays, *args, **kwargs):
        replays.append(self.shape_for(arrays))
        return real_run(self, arrays, *args, **kwargs)

    monkeypatch.setattr(cuda_graphs.VarlenGraphs, "run", run)
    return replays


def _hf_greedy(model_dir, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    return [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=tokens,
                        min_new_tokens=tokens, do_sample=False)[0, len(p):].tolist()
            for p in prompts]


@pytest.mark.parametrize("chunk", [None, 64])
def test_float32_prefill_and_mixed_graphs_are_token_exact(model_dir, monkeypatch, chunk):
    """Prompts arriving a few at a time, while others decode, run through the prefill and
    mixed CUDA graphs (decode rows beside prompts or their chunks; padding decode rows, tokens
    and sequences around them) and stay token-exact; with async scheduling (the default) steps
    are launched ahead, their newest tokens fed from the device."""
    replays = _record_varlen_replays(monkeypatch)
    fed = []
    values = async_steps.TokenFeed.values
    monkeypatch.setattr(async_steps.TokenFeed, "values",
                        lambda self, *args, **kwargs: fed.append(len(self.rows))
                        or values(self, *args, **kwargs))
    engine = Engine(EngineConfig(model_id=str(model_dir), dtype="float32",
                                 max_batch_total_tokens=50_000,
                                 max_batch_prefill_tokens=chunk), model_dir)
    assert engine.runner.prefill_graphs is not None
    g = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    waves = [[130], [1, 17], [300, 64, 5], [512], [33] * 8]
    seqs = []
    for wave in waves:
        for n in wave:
            seq = Sequence(len(seqs), torch.randint(2, vocab, (n,), generator=g).tolist(),
                           SamplingParams(), StoppingParams(max_tokens=NEW_TOKENS,
                                                            ignore_eos=True))
            seqs.append(seq)
            engine.add(seq)
        for _ in range(3):
            engine.step()
    while engine.has_work():
        engine.step()
    assert len(replays) >= len(waves), f"varlen graphs replayed {len(replays)} times"
    assert any(shape.decode_rows for shape in replays), "no mixed graph replayed"
    assert len(fed) > NEW_TOKENS, "steps launched ahead"
    del engine
    expected = _hf_greedy(model_dir, [s.prompt_ids for s in seqs], NEW_TOKENS)
    for s, theirs in zip(seqs, expected):
        assert s.output_ids == theirs, f"prompt of {len(s.prompt_ids)}"


def test_float32_verification_graphs_are_token_exact(model_dir, monkeypatch):
    """Speculative steps (drafts that land, and wrong ones) replay the verification graphs and
    stay token-exact."""
    replays = _record_varlen_replays(monkeypatch)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (5, 40, 130, 9, 77)]
    expected = _hf_greedy(model_dir, prompts, NEW_TOKENS)
    oracle_drafts(monkeypatch, [p + e for p, e in zip(prompts, expected)])
    engine = Engine(EngineConfig(model_id=str(model_dir), dtype="float32", speculate=3,
                                 max_batch_total_tokens=50_000), model_dir)
    assert engine.runner.verify_graphs is not None
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=NEW_TOKENS,
                                                            ignore_eos=True))
            for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == expected
    assert sum(shape.max_seqlen_q == 4 for shape in replays) >= 5
