"""`textgen-launcher -e`: the runtime environment, for bug reports (TGI's `--env`)."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from importlib import metadata

_PACKAGES = ("textgen", "torch", "triton", "transformers", "tokenizers", "numpy", "safetensors",
             "huggingface_hub", "nvidia-pytriton", "tritonclient")


def runtime_environment() -> str:
    rows = [("Target", f"{platform.machine()}-{platform.system().lower()}"),
            ("Platform", platform.platform()),
            ("Python", f"{platform.python_version()} ({sys.executable})")]
    for name in _PACKAGES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    rows.append(("CUDA devices", _cuda_devices()))
    rows.append(("tritonserver", _tritonserver()))
    lines = ["Runtime environment:"] + [f"{key}: {value}" for key, value in rows]
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines += ["nvidia-smi:", smi.stdout.rstrip() or smi.stderr.rstrip()]
    else:
        lines.append("nvidia-smi: N/A")
    return "\n".join(lines)


def _cuda_devices() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"none (torch CUDA build: {torch.version.cuda or 'no'})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {', '.join(sorted(set(names)))} (CUDA {torch.version.cuda})"


def _tritonserver() -> str:
    from textgen_backend.cli.tritonserver import find_tritonserver

    try:
        return str(find_tritonserver().binary)
    except FileNotFoundError as exc:
        return f"not found ({exc})"
