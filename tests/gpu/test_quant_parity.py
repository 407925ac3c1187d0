"""Quantized checkpoints on the GPU (our int4 kernels, CUDA graphs) against transformers running
the dequantized weights on the same GPU: GPTQ act-order in bfloat16 (at the first mismatch each
side's token is in the other's top 5) and AWQ in float32 (token-exact up to near ties)."""
import pytest
import torch

from quant_checkpoints import write_quantized
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.engine.sequence import Sequence
from greedy_parity import first_mismatch, record_top5
from tiny_models import build_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW_TOKENS = 24
CASES = {
    "gptq-actorder-bfloat16": (dict(method="gptq", group_size=128, desc_act=True), "bfloat16"),
    "awq-float32": (dict(method="awq", group_size=128), "float32"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("llama-q"), "llama", hidden_size=1024,
                            num_layers=4, num_heads=8, num_kv_heads=2, initializer_range=0.05,
                            max_position_embeddings=1024)


@pytest.mark.parametrize("case", CASES)
def test_quantized_engine_agrees_with_transformers(model_dir, tmp_path, monkeypatch, case):
    from transformers import AutoModelForCausalLM

    checkpoint, dtype = CASES[case]
    quant_dir, ref_dir = write_quantized(model_dir, tmp_path, **checkpoint)
    recorded = record_top5(monkeypatch)
    engine = Engine(EngineConfig(model_id=str(quant_dir), dtype=dtype, cuda_graphs="1,4,32",
                                 max_batch_total_tokens=50_000), quant_dir)
    assert engine.runner.decode_graphs is not None
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    # batches of 1 and 3 (GEMV kernel) and 24 (tensor-core kernel); prompts up to 130 tokens
    groups = [torch.randint(2, vocab, (b, n), generator=g).tolist()
              for b, n in ((1, 9), (3, 40), (8, 1), (8, 17), (8, 130))]
    seqs, seq_id = [], 0
    for batch in (groups[:1], groups[1:2], groups[2:]):
        running = []
        for prompts in batch:
            for p in prompts:
                running.append(Sequence(seq_id, p, SamplingParams(),
                                        StoppingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
                seq_id += 1
        for s in running:
            engine.add(s)
        while engine.has_work():
            engine.step()
        seqs += running
    del engine
    torch.cuda.empty_cache()

    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=getattr(torch, dtype)).cuda().eval()
    results, i = [], 0
    for prompts in groups:
        out = hf.generate(torch.tensor(prompts, device="cuda"), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
        top5 = torch.stack(out.scores, dim=1).topk(5, dim=-1).indices.tolist()
        for row, p in enumerate(prompts):
            s = seqs[i]
            assert s.prompt_ids == p
            results.append((s.output_ids, recorded[s.seq_id], out.sequences[row, len(p):].tolist(),
                            top5[row]))
            i += 1
    exact = sum(first_mismatch(ours, theirs) is None for ours, _, theirs, _ in results)
    if dtype == "float32":
        assert exact >= len(results) - 2, f"only {exact}/{len(results)} sequences token-exact"
    for ours, our_top5, theirs, their_top5 in results:
        assert len(ours) == NEW_TOKENS
        j = first_mismatch(ours, theirs)
        if j is not None:
            assert ours[j] in their_top5[j] and theirs[j] in our_top5[j], (case, j)
