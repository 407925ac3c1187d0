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
