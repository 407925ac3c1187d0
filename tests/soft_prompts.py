"""PEFT prompt-tuning saves (and TGIS decoder.pt files) for the test models, and a greedy
reference that feeds the soft prompt's embeddings before the prompt's (use_cache off: PEFT's
prompt-tuning generate with the KV cache on was found wrong after the first token)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_random_prompt_tuning(model_dir: Path, out_dir: Path, num_virtual_tokens: int,
                              seed: int, scale: float = 1.0) -> Path:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM",
                                                    num_virtual_tokens=num_virtual_tokens))
    embedding = model.prompt_encoder["default"].embedding
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        embedding.weight.copy_(torch.randn(embedding.weight.shape, generator=generator) * scale)
    model.save_pretrained(out_dir)
    return out_dir


def prompt_embeddings(directory: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")["prompt_embeddings"]


def greedy_after_soft_prompt(model, embeddings: torch.Tensor | None, prompt_ids: list[int],
                             max_new_tokens: int) -> list[int]:
    """Greedy ids of `model` (transformers, or a PEFT LoRA model) when `embeddings`
    [P, hidden] precede the prompt's token embeddings, with no KV cache."""
    ids = list(prompt_ids)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens = embed(torch.tensor([ids]))[0]
            inputs = tokens if embeddings is None else torch.cat([embeddings, tokens])
            logits = model(inputs_embeds=inputs[None], use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def peft_prompt_tuning_greedy(model_dir: Path, tuning_dir: Path, prompt_ids: list[int],
                              max_new_tokens: int) -> list[int]:
    """PEFT's own PeftModelForCausalLM.generate, KV cache off."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tuning_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False,
                             max_new_tokens=max_new_tokens, use_cache=False)
    return out[0, -max_new_tokens:].tolist()
