"""PEFT LoRA adapters for the tiny test models, and PEFT's own generation as their reference."""
from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def save_random_lora(model_dir: Path, out_dir: Path, rank: int, targets: list[str], seed: int,
                     alpha: float | None = None, **config) -> Path:
    """A PEFT LoRA with random A and B (PEFT's default zero B would change nothing), scaled up
    so that it visibly changes greedy answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets,
                      init_lora_weights=False, lora_dropout=0.0, **config)
    model = get_peft_model(base, lora)
    model.save_pretrained(out_dir)
    return out_dir


class PeftReference:
    """transformers + peft in float32 on the CPU: greedy ids of the base model with an adapter."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._models = {}

    def _model(self, adapter_dir: Path | None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if adapter_dir not in self._models:
            base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
            self._models[adapter_dir] = model.eval()
        return self._models[adapter_dir]

    def greedy(self, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int):
        model = self._model(adapter_dir)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False,
                                 max_new_tokens=max_new_tokens)
        return out[0, len(prompt_ids):].tolist()

def save_fused_lora(model_dir: Path, root: Path, rank: int, seed: int) -> tuple[Path, Path]:
    """A random LoRA on all seven projections whose q/k/v (and gate/up) share one A, saved twice:
    as PEFT trains it on the unfused model (the reference runs that one), and as trained on
    fused qkv_proj / gate_up_proj. Returns (unfused, fused) directories."""
    from safetensors.torch import load_file, save_file

    shared = save_random_lora(model_dir, root / "shared", rank, ATTENTION + MLP, seed=seed)
    tensors = load_file(shared / "adapter_model.safetensors")
    for name in list(tensors):
        for first, others in (("q_proj", ("k_proj", "v_proj")), ("gate_proj", ("up_proj",))):
            if f".{first}.lora_A" in name:
                for other in others:
                    tensors[name.replace(first, other)] = tensors[name].clone()
    save_file(tensors, shared / "adapter_model.safetensors")
    return shared, _fuse(shared, root / "fused")


def _fuse(unfused: Path, out: Path) -> Path:
    """The same LoRA as trained on fused qkv_proj / gate_up_proj (A shared by the shards, B
    stacked), as a checkpoint of a model with fused projections would hold it."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(unfused / "adapter_model.safetensors")
    fused = {}
    for name in [n for n in tensors if ".q_proj.lora_A" in n or ".gate_proj.lora_A" in n]:
        shards = ["q_proj", "k_proj", "v_proj"] if "q_proj" in name else ["gate_proj", "up_proj"]
        target = "qkv_proj" if "q_proj" in name else "gate_up_proj"
        fused[name.replace(shards[0], target)] = tensors[name]
        fused[name.replace(shards[0], target).replace("lora_A", "lora_B")] = torch.cat(
            [tensors[name.replace(shards[0], s).replace("lora_A", "lora_B")] for s in shards])
    for name in [n for n in tensors if ".o_proj." in n or ".down_proj." in n]:
        fused[name] = tensors[name]
    out.mkdir()
    save_file(fused, out / "adapter_model.safetensors")
    config = json.loads((unfused / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
