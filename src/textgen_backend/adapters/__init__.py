"""LoRA adapters: PEFT directories, where they come from, merges, and their residency on the
device."""
