"""Reading a whole safetensors file without holding the GIL: its JSON header, then its bytes
read with `readinto` (which releases the GIL) into one buffer, viewed per tensor. The
safetensors library copies tensors out of its mapping while holding the GIL, which stalled the
engine thread of the same process by up to 58 ms while an adapter loaded beside it; this
reader, at most ~4 ms (`bench/bench_adapter_read_gil.py`, bench/RESULTS.md section 22)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CHUNK_BYTES = 8 << 20


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, on the CPU; ValueError for a file that is not whole."""
    with open(path, "rb", buffering=0) as f:
        header_bytes = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} has no valid safetensors header: {exc}") from None
        header.pop("__metadata__", None)
        body = torch.empty(os.fstat(f.fileno()).st_size - 8 - header_bytes, dtype=torch.uint8)
        view, got = memoryview(body.numpy()), 0
        while got < len(view):
            read = f.readinto(view[got:got + _CHUNK_BYTES])
            if not read:  # it shrank while being read (rewritten in place)
                raise ValueError(f"{path} ended {len(view) - got} bytes early")
            got += read
    tensors = {}
    for name, meta in header.items():
        start, end = meta["data_offsets"]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, not one of "
                             f"{', '.join(_DTYPES)}")
        data = body[start:end]
        if start % dtype.itemsize:  # a view of another dtype must start on its alignment
            data = data.clone()
        try:
            tensors[name] = data.view(dtype).view(meta["shape"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: tensor {name!r} does not fit its {end - start} bytes "
                             f"({exc})") from None
    return tensors
