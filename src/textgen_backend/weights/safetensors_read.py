"""Reading a whole safetensors file without holding the GIL: its JSON header, then its bytes
read with `readinto` (which releases the GIL) into one buffer, viewed per tensor. The
safetensors library copies tensors out of its mapping while holding the GIL, which stalled the
engine thread of the same process by up to 51 ms while an adapter loaded beside it; this
reader, at most ~1 ms (`bench/bench_adapter_read_gil.py`, bench/RESULTS.md section 22)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CHUNK_BYTES = 8 << 20
_MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, on the CPU; ValueError for a file that is not whole."""
    with open(path, "rb", buffering=0) as f:
        header_bytes = int.from_bytes(f.read(8), "little")
        body_bytes = os.fstat(f.fileno()).st_size - 8 - header_bytes
        if header_bytes > _MAX_HEADER_BYTES or body_bytes < 0:
            raise ValueError(f"{path} is no safetensors file: its header claims "
                             f"{header_bytes} bytes")
        try:
            header = json.loads(f.read(header_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} has no valid safetensors header: {exc}") from None
        header.pop("__metadata__", None)
        body = torch.empty(body_bytes, dtype=torch.uint8)
        view, got = memoryview(body.numpy()), 0
        while got < len(view):
            read = f.readinto(view[got:got + _CHUNK_BYTES])
            if not read:  # it shrank while being read (rewritten in place)
                raise ValueError(f"{path} ended {len(view) - got} bytes early")
            got += read
    tensors = {}
    for name, meta in header.items():
        try:
            (start, end), dtype_name, shape = meta["data_offsets"], meta["dtype"], meta["shape"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from None
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype_name}, not one of "
                             f"{', '.join(_DTYPES)}")
        if not 0 <= start <= end <= body_bytes or \
                end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} does not fit its bytes "
                             f"[{start}, {end}) of {body_bytes}")
        data = body[start:end]
        if start % dtype.itemsize:  # a view of another dtype must start on its alignment
            data = data.clone()
        tensors[name] = data.view(dtype).view(shape)
    return tensors
