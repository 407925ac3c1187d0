"""How long reading a LoRA adapter file holds up another Python thread (the engine's host work
between launches runs on one while the adapter loader reads on another). Writes a
Llama-3-8B-shaped rank-16 adapter (896 tensors, 84 MB in bf16), then reads it repeatedly with
the safetensors library and with our reader (weights/safetensors_read.py, what peft_format.py
uses) while a ticker thread runs small torch ops; prints the read time and the ticker's gaps.
CPU only:

    python bench/bench_adapter_read_gil.py
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import print_table
from textgen_backend.weights.safetensors_read import read_safetensors

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
          "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}


def write_adapter(path: Path, rank: int = 16) -> None:
    tensors = {}
    for layer in range(32):
        for name, (k, n) in SHAPES.items():
            module = f"base_model.model.model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
            tensors[f"{module}.lora_A.weight"] = torch.randn(rank, k).to(torch.bfloat16)
            tensors[f"{module}.lora_B.weight"] = torch.randn(n, rank).to(torch.bfloat16)
    save_file(tensors, path)


def read_with_library(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def ticker_gaps(read, path: Path, reps: int) -> tuple[float, float, float, float]:
    """(read ms, quiet gap ms, worst gap ms, p99 gap ms) of a thread doing 20 small torch ops
    per tick while `read` runs reps times."""
    gaps, stop = [], threading.Event()

    def tick():
        x, last = torch.ones(64, 64), time.perf_counter()
        while not stop.is_set():
            for _ in range(20):
                x = x * 1.0001
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.2)
    quiet = len(gaps)
    started = time.perf_counter()
    for _ in range(reps):
        read(path)
    seconds = (time.perf_counter() - started) / reps
    time.sleep(0.1)
    stop.set()
    thread.join()
    during = np.array(gaps[quiet:])
    return (1e3 * seconds, 1e3 * float(np.median(gaps[:quiet])), 1e3 * float(during.max()),
            1e3 * float(np.percentile(during, 99)))


def main() -> None:
    path = Path(tempfile.mkdtemp(prefix="adapter-read-")) / "adapter_model.safetensors"
    write_adapter(path)
    library, ours = read_with_library(path), read_safetensors(path)
    assert all(torch.equal(library[k], ours[k]) for k in library)
    rows = []
    for round_ in range(4):
        for name, read in (("safetensors library", read_with_library),
                           ("ours (readinto, weights/safetensors_read.py)", read_safetensors)):
            rows.append([round_, name, *(f"{v:.2f}" for v in ticker_gaps(read, path, 5))])
    print_table(f"Reading a rank-16 Llama-3-8B adapter ({path.stat().st_size / 1e6:.0f} MB) "
                "beside a ticking thread", ["round", "reader", "read ms", "quiet gap ms",
                                            "worst gap ms", "p99 gap ms"], rows)


if __name__ == "__main__":
    main()
