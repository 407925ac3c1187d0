"""Serving compiles no LoRA kernel: the engine's start runs every variant (AdapterSlots.
compile_kernels), so the first requests with adapters, short and long prompts, chunked, beside
base rows, never stop the running batch for Triton's compiler (the first H100 run saw a 1.1 s
step while adapters loaded)."""
import pytest
import torch
import triton

from lora_adapters import ATTENTION, MLP, save_random_lora
from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.config import EngineConfig
from textgen_backend.engine.engine import Engine
from textgen_backend.engine.sequence import Sequence
from textgen_backend.models.config import ModelConfig
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from tiny_models import build_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_first_adapter_requests_compile_no_lora_kernel(tmp_path, monkeypatch):
    model_dir = build_tiny_model(tmp_path / "model", "llama", hidden_size=256, num_layers=2,
                                 num_heads=4, num_kv_heads=2, max_position_embeddings=2048)
    adapters = [save_random_lora(model_dir, tmp_path / f"a{rank}", rank, targets, seed=rank)
                for rank, targets in ((4, ATTENTION), (8, MLP), (16, ATTENTION + MLP))]
    config = EngineConfig(model_id=str(model_dir), max_lora_rank=16, max_active_adapters=4,
                          adapter_source="local", max_input_tokens=1500, max_total_tokens=1600,
                          max_batch_prefill_tokens=512)
    engine = Engine(config, model_dir)
    catalog = AdapterCatalog(config, ModelConfig.from_dir(model_dir))
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda *, fn, **_: compiled.append(f"{fn.module}.{fn.name}"))
    g = torch.Generator().manual_seed(0)
    lengths = [1, 3, 17, 100, 255, 256, 300, 700, 1500, 40, 9, 513]
    seqs = [Sequence(i, torch.randint(2, 200, (n,), generator=g).tolist(), SamplingParams(),
                     StoppingParams(max_tokens=8 + i, ignore_eos=True),
                     adapter=(catalog.resolve(str(adapters[i % 4]), "local", "") if i % 4 < 3
                              else None))
            for i, n in enumerate(lengths)]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
    assert all(len(s.output_ids) == 8 + s.seq_id for s in seqs)
    assert [name for name in compiled if "lora" in name] == []
