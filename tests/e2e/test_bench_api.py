"""A CPU smoke run of bench/bench_api.py (the REST front end against gRPC direct), from bench/
as the README runs the benches: both paths complete and the table has both rows."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_api_smoke():
    done = subprocess.run([sys.executable, "bench_api.py", "--serve-tiny", "--streams", "4",
                           "--requests", "8", "--tokens", "16"], cwd=BENCH, capture_output=True,
                          text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()
            if line.startswith("| gRPC") or line.startswith("| HTTP")]
    assert [r[0].strip().split(",")[0] for r in rows] == ["gRPC", "HTTP"]
    assert all(int(r[1]) == 8 and float(r[2].replace(",", "")) > 0 for r in rows)
