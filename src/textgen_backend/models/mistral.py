"""Mistral: Llama with sliding-window attention (the window comes from config.json)."""
from textgen_backend.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
