# Keep this guard first, before anything imports textgen_kernels: Triton reads TRITON_INTERPRET
# when @triton.jit runs (at import), and without CUDA kernels must be interpreted on the CPU.
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import sys
from pathlib import Path

# Shared test helpers (tiny_models, server, assets) live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
