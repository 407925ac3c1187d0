"""OpenAI-Triton kernels for textgen, each beside a pure-torch reference of the same function.

The references are also the engine's torch path (CPU, and GPU with --disable-custom-kernels).
"""
