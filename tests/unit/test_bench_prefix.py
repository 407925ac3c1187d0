"""A CPU smoke run of bench/bench_prefix.py --tiny: its three tables come out with the cache's
hits where they must be (timings on a tiny CPU model compare nothing: the GPU run does)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
BENCH = Path(__file__).resolve().parents[2] / "bench"


def _rows(out: str, title: str) -> list[list[str]]:
    block = out.split(title, 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in block.splitlines()[3:] if line.startswith("|")]


def test_bench_prefix_tiny_smoke():
    # as the README runs the benches: from bench/, which is then on sys.path (its common.py)
    done = subprocess.run([sys.executable, "bench_prefix.py", "--tiny"], cwd=BENCH,
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    on, off = _rows(out, "Shared prefix")
    assert on[0] == "on" and int(on[5].replace(",", "")) > 0 and off[5] == "0"
    turns = _rows(out, "Multi-turn chat")
    assert [t[3] for t in turns][0] == "0%" and all(re.fullmatch(r"[1-9]\d*%", t[3])
                                                   for t in turns[1:])
    chunked, whole = _rows(out, "Mixed load")
    assert chunked[0] == "64" and whole[0] == "off"  # --tiny's chunk size
    assert all(float(row[3]) > 0 and float(row[6]) > 0 for row in (chunked, whole))
