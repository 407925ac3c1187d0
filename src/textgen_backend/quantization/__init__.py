"""Quantization on the fly: `--quantize eetq | fp8 | bitsandbytes | bitsandbytes-nf4 |
bitsandbytes-fp4` quantizes a dense checkpoint's projections after loading. formats.py holds
each scheme's numbers (pure torch, the reference for kernels), linear.py the layer, schemes.py
which scheme is which and the swap into a loaded model. GPTQ / AWQ checkpoints, quantized
before loading, are weights/quantization.py and layers/quantized_linear.py."""
