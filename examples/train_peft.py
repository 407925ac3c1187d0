"""Trains a small PEFT adapter (seconds on a CPU) that textgen serves: a LoRA (served by
`adapter_id`) or a prompt tuning (a soft prompt, served by `prefix_id` from the prefix store).
The README's walkthroughs.

    python examples/train_peft.py lora MODEL_DIR OUT_DIR
    python examples/train_peft.py prompt-tuning MODEL_DIR OUT_DIR

Either teaches the model one fact ("The secret password is swordfish."), so that it visibly
changes the base model's answer.
"""
from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = ["The secret password is swordfish.", "Remember: the secret password is swordfish.",
         "Q: What is the secret password? A: The secret password is swordfish."]
# (config, learning rate, steps). A soft prompt of 30 steps was at the edge: the rounding of
# one CPU model gave " swordfish", of another " sword"; at 60 every count from 45 to 100 did.
CONFIGS = {
    "lora": (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
             3e-3, 30),
    "prompt-tuning": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), 3e-2, 60),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(CONFIGS))
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, help="default: 30 (lora), 60 (prompt-tuning)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    config, learning_rate, steps = CONFIGS[args.kind]
    steps = args.steps or steps
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=learning_rate)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(args.out_dir)
    print(f"trained {steps} steps (final loss {loss.item():.3f}); saved {args.out_dir}")


if __name__ == "__main__":
    main()
