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


def test_bench_online_smoke(tiny_server, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_online import workload

    rates, requests, warmup, max_input, max_total = ["4", "inf"], 6, 2, 12, 140
    jobs = workload(requests, 0, max_input, max_total)
    assert all(n_in <= max_input and n_in + n_out <= max_total for n_in, n_out in jobs)
    drawn_tokens = sum(n for _, n in jobs)
    before = settled_metrics(tiny_server)
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_online.py"), "--url", tiny_server.grpc_url,
         "--rates", ",".join(rates), "--concurrency", "3", "--metrics-url",
         tiny_server.metrics_url, "--requests", str(requests), "--warmup", str(warmup),
         "--max-input-tokens", str(max_input), "--max-total-tokens", str(max_total),
         "--json", str(tmp_path / "online.json"), "--plot", str(tmp_path / "online.png")],
        capture_output=True, text=True, timeout=300,
        # a script run as users run it: its own folder (bench/common.py) on sys.path
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert "TTFT p99" in table[0] and "ITL p50 / step" in table[0]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["4/s", "inf/s", "3 streams"]

    summary = json.loads((tmp_path / "online.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=BENCH).stdout.strip()
    assert summary["commit"] == commit and f"commit {commit}," in result.stdout
    assert summary["drawn_output_tokens"] == drawn_tokens
    assert [r["rate"] for r in summary["results"]] == [4.0, "inf", "inf"]
    for r in summary["results"]:
        assert r["requests"] == r["completed"] == requests and r["failed"] == 0
        assert r["output_tokens"] == drawn_tokens
        # every word is at least one token of the tiny byte-level BPE
        assert r["input_tokens"] >= summary["drawn_input_tokens"] > 0
        assert r["output_tokens_per_s"] > 0 and r["client_cpu_ms_per_request"] > 0
        assert r["achieved_rate"] > 0
        # the server's own decode steps over the run, read from its metrics endpoint
        assert r["decode_step_ms"] > 0 and r["decode_batch"] >= 1
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert 0 < r[key]["p50"] <= r[key]["p99"]
        assert r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]
    assert (tmp_path / "online.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    after = settled_metrics(tiny_server)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    warm_up_tokens = sum(n for _, n in jobs[:warmup])  # the first requests, sent once before
    loads = len(rates) + 1                             # and the closed-loop run
    assert delta('tgi_request_count{kind="stream"}') == loads * requests + warmup
    assert (delta("tgi_request_generated_tokens_sum")
            == loads * drawn_tokens + warm_up_tokens)
