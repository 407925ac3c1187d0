"""LoRA on the GPU: the shrink / expand Triton kernels inside the engine (per token in the decode
CUDA graphs, per tile of tokens in long prefills, K split), with adapters of different ranks and
targets, one trained on the fused projections, and base-model rows in one batch: float32 greedy
token-exact against PEFT on the same GPU."""
import pytest
import torch

from lora_adapters import ATTENTION, MLP, save_fused_lora, save_random_lora
from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_kernels import lora
from tiny_models import build_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW_TOKENS = 24


def peft_greedy(model_dir, adapter_dir, prompts: list[list[int]]) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).cuda().eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(input_ids=torch.tensor([prompt], device="cuda"),
                                 do_sample=False, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs


def test_float32_adapters_are_token_exact_against_peft(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", "llama", hidden_size=256, num_layers=2,
                                 num_heads=4, num_kv_heads=2, initializer_range=0.05,
                                 max_position_embeddings=1024)
    unfused, fused = save_fused_lora(model_dir, tmp_path, 8, seed=9)
    adapters = {
        "attn-r4": (save_random_lora(model_dir, tmp_path / "attn", 4, ATTENTION, seed=1),) * 2,
        "mlp-r8": (save_random_lora(model_dir, tmp_path / "mlp", 8, MLP, seed=2),) * 2,
        "all-r16-rslora": (save_random_lora(model_dir, tmp_path / "all", 16, ATTENTION + MLP,
                                            seed=3, use_rslora=True),) * 2,
        "fused-r8": (fused, unfused),  # (served, PEFT's reference)
    }
    config = EngineConfig(model_id=str(model_dir), dtype="float32", max_lora_rank=16,
                          max_active_adapters=8, adapter_source="local")
    engine = Engine(config, model_dir)
    assert engine.runner.decode_graphs is not None, "CUDA graphs should be captured on the GPU"
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    g = torch.Generator().manual_seed(0)
    # two prompts past the tiles' threshold (their prefill runs per tile), the rest short
    lengths = [300, 5, 17, 40, 280, 9, 3, 60, 12, 33]
    assert lora.TILE_MIN_TOKENS <= 300
    names = [None, "attn-r4", "mlp-r8", "all-r16-rslora", "fused-r8", None, "fused-r8",
             "attn-r4", "all-r16-rslora", "mlp-r8"]
    prompts = [torch.randint(2, engine.model_config.vocab_size, (n,), generator=g).tolist()
               for n in lengths]
    seqs = [Sequence(i, p, SamplingParams(), StoppingParams(max_tokens=NEW_TOKENS,
                                                            ignore_eos=True),
                     adapter=catalog.resolve(str(adapters[name][0]), "local", "") if name
                     else None)
            for i, (p, name) in enumerate(zip(prompts, names))]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
    del engine
    torch.cuda.empty_cache()
    expected = {}
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        reference = adapters[name][1] if name else None
        for row, tokens in zip(rows, peft_greedy(model_dir, reference, [prompts[i] for i in rows])):
            expected[row] = tokens
    assert [s.output_ids for s in seqs] == [expected[i] for i in range(len(seqs))]
    base = peft_greedy(model_dir, None, [prompts[1], prompts[4]])
    assert base != [expected[1], expected[4]], "the adapters should change the answers"
