"""A CPU smoke run of bench/bench_online.py (Poisson arrivals per rate, streaming gRPC) against
the tiny model's ensemble: its table, JSON and plot, and its token counts against the server's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import settled_metrics

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_online_smoke(tiny_server, tmp_path):
    sys.path.insert(0, str(BENCH))
    from common import sharegpt_workload

    rates, requests, max_len = ["4", "inf"], 6, 8
    jobs = sharegpt_workload(requests, 0, max_len)
    expected_tokens = sum(n for _, n in jobs)
    warm_up_tokens = sum(n for _, n in jobs[:4])  # the first 4 requests, sent once before
    before = settled_metrics(tiny_server)
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_online.py"), "--url", tiny_server.grpc_url,
         "--rates", ",".join(rates), "--requests", str(requests), "--max-len", str(max_len),
         "--json", str(tmp_path / "online.json"), "--plot", str(tmp_path / "online.png")],
        capture_output=True, text=True, timeout=300,
        # a script run as users run it: its own folder (bench/common.py) on sys.path
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Online serving" in result.stdout and "TTFT p99" in result.stdout
    summary = json.loads((tmp_path / "online.json").read_text())
    assert [r["rate"] for r in summary["results"]] == [4.0, "inf"]
    for r in summary["results"]:
        assert r["requests"] == requests and r["output_tokens"] == expected_tokens
        assert r["output_tokens_per_s"] > 0 and r["client_cpu_ms_per_request"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert 0 < r[key]["p50"] <= r[key]["p99"]
        assert r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]
    assert (tmp_path / "online.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = settled_metrics(tiny_server)
    generated = "tgi_request_generated_tokens_sum"
    assert (after[generated] - before.get(generated, 0)
            == len(rates) * expected_tokens + warm_up_tokens)
