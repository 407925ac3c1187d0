"""Online serving benchmark against a running server, as users load it: ShareGPT-shaped requests
(lognormal lengths, seeded; exact output lengths through min_tokens = max_tokens and ignore_eos)
arriving as a Poisson process at each request rate, streamed over gRPC through the ensemble.
Per rate: achieved rate, output tokens/s, and p50 / p99 of time to first token, inter-token
latency (genai-perf's: (last - first response) / (tokens - 1)) and end-to-end latency; the load
generator's own CPU time per request is printed so that it can be told apart from the server's.

    python bench/bench_online.py --url localhost:8001 --rates 2,8,32,inf --requests 200 \
        [--json results.json] [--plot latency.png]

`inf` sends every request at once (saturation). On a GPU machine, `--serve-llama3-8b` first
starts tritonserver on a random-weight Llama-3-8B-shaped model (bf16, bench_throughput.py's
engine settings) and measures that.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import print_table, sharegpt_workload, synthetic_prompt


@dataclass
class RequestTiming:
    sent: float                 # time.perf_counter() seconds
    responses: list[float]      # arrival of each streamed response
    output_tokens: int


def run_rate(url: str, rate: float, jobs: list[tuple[int, int]], seed: int) -> dict:
    """Sends `jobs` (input words, output tokens) as a Poisson process of `rate` requests/s."""
    from textgen_client import TextgenClient

    gaps = np.random.default_rng(seed).exponential(1 / rate, len(jobs)) if math.isfinite(rate) \
        else np.zeros(len(jobs))
    arrivals = np.cumsum(gaps) - gaps[0]
    timings: list[RequestTiming | None] = [None] * len(jobs)
    local = threading.local()

    def one(index: int, start: float) -> None:
        time.sleep(max(0.0, start + arrivals[index] - time.perf_counter()))
        if not hasattr(local, "client"):
            local.client = TextgenClient(url)
        n_in, n_out = jobs[index]
        sent, responses, tokens = time.perf_counter(), [], 0
        for chunk in local.client.stream(synthetic_prompt(n_in), max_tokens=n_out,
                                         min_tokens=n_out, ignore_eos=True):
            responses.append(time.perf_counter())
            tokens = chunk.num_output_tokens
        timings[index] = RequestTiming(sent, responses, tokens)

    cpu_started = time.process_time()
    with futures.ThreadPoolExecutor(min(len(jobs), 512)) as pool:
        start = time.perf_counter() + 0.05
        for done in [pool.submit(one, i, start) for i in range(len(jobs))]:
            done.result()
    cpu_seconds = time.process_time() - cpu_started
    return summarize(rate, timings, cpu_seconds)


def summarize(rate: float, timings: list[RequestTiming], cpu_seconds: float) -> dict:
    ttft = [(t.responses[0] - t.sent) * 1e3 for t in timings]
    e2e = [(t.responses[-1] - t.sent) * 1e3 for t in timings]
    itl = [(t.responses[-1] - t.responses[0]) * 1e3 / (t.output_tokens - 1)
           for t in timings if t.output_tokens > 1]
    first_sent = min(t.sent for t in timings)
    span = max(t.responses[-1] for t in timings) - first_sent
    sent_span = max(t.sent for t in timings) - first_sent
    tokens = sum(t.output_tokens for t in timings)

    def pct(values):
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

    return {"rate": rate if math.isfinite(rate) else "inf", "requests": len(timings),
            "achieved_rate": len(timings) / sent_span if sent_span > 0 else float("inf"),
            "output_tokens": tokens, "output_tokens_per_s": tokens / span,
            "ttft_ms": pct(ttft), "itl_ms": pct(itl), "e2e_ms": pct(e2e),
            "client_cpu_ms_per_request": cpu_seconds * 1e3 / len(timings)}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [r["output_tokens_per_s"] for r in results]
    fig, (ttft, itl) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, title in ((ttft, "ttft_ms", "time to first token"),
                             (itl, "itl_ms", "inter-token latency")):
        for p in ("p50", "p99"):
            axis.plot(throughput, [r[key][p] for r in results], marker="o", label=p)
        for r, x in zip(results, throughput):
            axis.annotate(f"{r['rate']}/s", (x, r[key]["p50"]), fontsize=8)
        axis.set(xlabel="output tokens/s", ylabel="ms", title=title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    parser.add_argument("--rates", default="2,8,32,inf", help="requests/s, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="requests per rate")
    parser.add_argument("--max-len", type=int, default=1024,
                        help="clip prompt words and output tokens to this (the server's limits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write the latency-throughput plot (PNG)")
    parser.add_argument("--serve-llama3-8b", action="store_true",
                        help="serve a random-weight Llama-3-8B shape (GPU) and measure it")
    args = parser.parse_args()
    server = serve_llama3_8b() if args.serve_llama3_8b else None
    if server is not None:
        args.url = server.grpc_url
    try:
        measure(args)
    finally:
        if server is not None:
            server.stop()


def serve_llama3_8b():
    import tempfile

    from bench_throughput import engine_config
    from common import LLAMA3_8B, llama3_8b_dir, write_synthetic_tokenizer
    from server import TritonServer

    model_dir = llama3_8b_dir()
    write_synthetic_tokenizer(model_dir, LLAMA3_8B["vocab_size"])
    started = time.perf_counter()
    server = TritonServer(engine_config(model_dir), Path(tempfile.mkdtemp()), startup_timeout=600)
    print(f"served a Llama-3-8B shape in {time.perf_counter() - started:.0f}s", flush=True)
    return server


def measure(args) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    jobs = sharegpt_workload(args.requests, args.seed, args.max_len)
    print(f"bench_online: commit {commit or '?'}, {args.url}, {args.requests} requests per rate, "
          f"{sum(n for _, n in jobs)} output tokens each", flush=True)
    run_rate(args.url, float("inf"), jobs[:4], args.seed)  # warm-up, not reported
    results = [run_rate(args.url, float(rate), jobs, args.seed)
               for rate in args.rates.split(",")]
    print_table("Online serving (streaming gRPC through the ensemble; latencies in ms)",
                ["rate req/s", "achieved", "output tok/s", "TTFT p50", "TTFT p99", "ITL p50",
                 "ITL p99", "E2E p50", "E2E p99", "client CPU ms/req"],
                [[r["rate"], r["achieved_rate"], r["output_tokens_per_s"], r["ttft_ms"]["p50"],
                  r["ttft_ms"]["p99"], r["itl_ms"]["p50"], r["itl_ms"]["p99"],
                  r["e2e_ms"]["p50"], r["e2e_ms"]["p99"], r["client_cpu_ms_per_request"]]
                 for r in results])
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "url": args.url, "results": results},
                                        indent=1))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
