"""Trains a small LoRA with PEFT (a few seconds on a CPU) and saves it as a PEFT directory that
textgen serves by `adapter_id`: the README's adapter walkthrough.

    python examples/train_lora.py MODEL_DIR OUT_DIR

It teaches the model one fact ("The secret password is swordfish."), so that the adapter
visibly changes the base model's answer.
"""
from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = ["The secret password is swordfish.", "Remember: the secret password is swordfish.",
         "Q: What is the secret password? A: The secret password is swordfish."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "o_proj",
                                                            "gate_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(args.out_dir)
    print(f"trained {args.steps} steps (final loss {loss.item():.3f}); saved {args.out_dir}")


if __name__ == "__main__":
    main()
