"""Qwen2: Llama with biases on the Q/K/V projections (not on o_proj)."""
from textgen_backend.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
