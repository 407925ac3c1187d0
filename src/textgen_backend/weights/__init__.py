"""Getting weights: loading safetensors, quantized checkpoint formats (GPTQ/AWQ), GGUF and
.bin conversion, hub downloads, the demo model."""
