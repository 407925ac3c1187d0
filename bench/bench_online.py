"""Online serving benchmark against a running server, as users load it: ShareGPT-shaped requests
(lognormal lengths, seeded; exact output lengths through min_tokens = max_tokens and ignore_eos)
arriving as a Poisson process at each request rate, streamed over gRPC through the ensemble.
Per rate: achieved rate, output tokens/s, and p50 / p99 of time to first token, inter-token
latency (genai-perf's: (last - first response) / (tokens - 1)) and end-to-end latency; the load
generator's own CPU time per request is printed so that it can be told apart from the server's.

    python bench/bench_online.py --url localhost:8001 --rates 2,8,32,inf --requests 200 \
        [--concurrency 64] [--max-input-tokens 1024 --max-total-tokens 2048] \
        [--json results.json] [--plot lat.png]

`inf` sends every request at once (saturation); `--concurrency N` adds closed-loop runs: N
streams, each sending its next request when the last one ended. From the server's metrics
endpoint (`--metrics-url`, default port 8002 of the --url host), each load's mean decode step
and batch size are printed beside the inter-token latency the client saw, and the mean time to
first token and queue time as the generator measured them beside the client's TTFT. The load generator is one asyncio event loop
(tritonclient.grpc.aio, one stream per request); `--client threads` uses textgen_client's
blocking streams instead, a thread each, to compare their CPU cost. On a GPU machine,
`--serve-llama3-8b` first starts tritonserver on a random-weight Llama-3-8B-shaped model (bf16,
bench_throughput.py's engine settings) and measures that.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as futures
import json
import math
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as grpcaio

from common import (engine_steps, histogram_totals, print_table, read_metrics,
                    sharegpt_workload)

# Where a request's first token waits, as the server sees it: arrival at the generator to the
# first token at its output thread, and validation to the first prefill.
SERVER_LATENCIES = ("textgen_time_to_first_token_seconds", "tgi_request_queue_duration")
from textgen_client import TextgenClient
from textgen_client.client import build_inputs

# One token each, with their leading space, in the demo model's (SmolLM2's) byte-level BPE, so a
# prompt of n words is n tokens there; the synthetic tokenizer of --serve-llama3-8b uses ids.
COMMON_WORDS = (
    "the of and to in is that for it with as was on be at by this had not are but from or have "
    "an they which one you were all her she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three").split()


def workload(count: int, seed: int, max_input: int, max_total: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens): bench_throughput's ShareGPT-shaped lengths, the prompt
    clipped to max_input and prompt + output to max_total (the server's limits)."""
    jobs = []
    for n_in, n_out in sharegpt_workload(count, seed, max_total):
        n_in = min(n_in, max_input)
        jobs.append((n_in, max(1, min(n_out, max_total - n_in))))
    return jobs


def prompts(jobs: list[tuple[int, int]], seed: int, synthetic_ids: bool) -> list[str]:
    """A distinct prompt of n_in words per job (no two share a prefix worth caching)."""
    rng = np.random.default_rng(seed + 1)
    if synthetic_ids:
        return [" ".join(f"t{i}" for i in rng.integers(0, 128000, n)) for n, _ in jobs]
    return [" ".join(rng.choice(COMMON_WORDS, n)) for n, _ in jobs]


@dataclass
class RequestTiming:
    scheduled: float            # time.perf_counter() seconds: its Poisson arrival
    sent: float = 0.0
    responses: list[float] = field(default_factory=list)  # arrival of each response with tokens
    input_tokens: int = 0       # as the server counted them
    output_tokens: int = 0
    error: str | None = None


async def _stream_aio(client, prompt: str, n_out: int, timing: RequestTiming) -> None:
    inputs = build_inputs([prompt], stream=True, max_tokens=n_out, min_tokens=n_out,
                          ignore_eos=True)
    finished = asyncio.Event()

    async def requests():
        yield {"model_name": "ensemble", "inputs": inputs, "request_id": uuid.uuid4().hex,
               "parameters": {"triton_enable_empty_final_response": True}}
        await finished.wait()   # keep the stream open until the final response

    timing.sent = time.perf_counter()
    call = None
    try:
        call = client.stream_infer(requests())
        async for result, error in call:
            if error is not None:
                timing.error = str(error)
                break
            tokens = result.as_numpy("num_output_tokens")
            if tokens is not None:
                timing.responses.append(time.perf_counter())
                timing.output_tokens = int(tokens.reshape(-1)[0])
                timing.input_tokens = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    except Exception as exc:  # a broken stream is a failed request, not a failed benchmark
        timing.error = repr(exc)
    finally:
        finished.set()
        if timing.error is not None and call is not None:
            call.cancel()


async def _run_aio(url: str, texts: list[str], jobs, timings: list[RequestTiming]) -> None:
    client = grpcaio.InferenceServerClient(url)  # one channel: all streams share it

    async def one(index: int) -> None:
        await asyncio.sleep(max(0.0, timings[index].scheduled - time.perf_counter()))
        await _stream_aio(client, texts[index], jobs[index][1], timings[index])

    try:
        await asyncio.gather(*(one(i) for i in range(len(jobs))))
    finally:
        await client.close()


async def _run_closed_loop(url: str, texts: list[str], jobs, timings: list[RequestTiming],
                           streams: int) -> None:
    client = grpcaio.InferenceServerClient(url)
    pending = iter(range(len(jobs)))  # shared by the streams (one event loop: no lock)

    async def stream() -> None:
        for index in pending:
            timings[index].scheduled = time.perf_counter()
            await _stream_aio(client, texts[index], jobs[index][1], timings[index])

    try:
        await asyncio.gather(*(stream() for _ in range(streams)))
    finally:
        await client.close()


def _run_threads(url: str, texts: list[str], jobs, timings: list[RequestTiming]) -> None:
    local = threading.local()

    def one(index: int) -> None:
        timing = timings[index]
        time.sleep(max(0.0, timing.scheduled - time.perf_counter()))
        if not hasattr(local, "client"):
            local.client = TextgenClient(url)
        timing.sent = time.perf_counter()
        try:
            for chunk in local.client.stream(texts[index], max_tokens=jobs[index][1],
                                             min_tokens=jobs[index][1], ignore_eos=True):
                timing.responses.append(time.perf_counter())
                timing.output_tokens, timing.input_tokens = (chunk.num_output_tokens,
                                                             chunk.num_input_tokens)
        except Exception as exc:
            timing.error = repr(exc)

    with futures.ThreadPoolExecutor(min(len(jobs), 512)) as pool:
        list(pool.map(one, range(len(jobs))))


def run_concurrency(url: str, streams: int, texts: list[str], jobs) -> dict:
    """Sends `jobs` over `streams` closed-loop streams (asyncio client)."""
    timings = [RequestTiming(0.0) for _ in jobs]
    cpu_started = time.process_time()
    asyncio.run(_run_closed_loop(url, texts, jobs, timings, streams))
    result = summarize(math.inf, timings, time.process_time() - cpu_started)
    result["load"] = f"{streams} streams"
    return result


def run_rate(url: str, rate: float, texts: list[str], jobs, seed: int,
             client: str = "asyncio") -> dict:
    """Sends `jobs` (prompt, output tokens) as a Poisson process of `rate` requests/s."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(jobs)) if math.isfinite(rate) \
        else np.zeros(len(jobs))
    start = time.perf_counter() + 0.05
    timings = [RequestTiming(start + t) for t in np.cumsum(gaps) - gaps[0]]
    cpu_started = time.process_time()
    if client == "asyncio":
        asyncio.run(_run_aio(url, texts, jobs, timings))
    else:
        _run_threads(url, texts, jobs, timings)
    return summarize(rate, timings, time.process_time() - cpu_started)


def summarize(rate: float, timings: list[RequestTiming], cpu_seconds: float) -> dict:
    done = [t for t in timings if t.error is None and t.responses]
    errors = sorted({t.error for t in timings if t.error is not None})

    def pct(values):
        if not values:
            return {"p50": math.nan, "p99": math.nan}
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

    first_sent = min(t.sent for t in timings)
    sent_span = max(t.sent for t in timings) - first_sent
    span = max((t.responses[-1] for t in done), default=first_sent) - first_sent
    tokens = sum(t.output_tokens for t in done)
    return {
        "rate": rate if math.isfinite(rate) else "inf", "load": f"{rate:g}/s",
        "requests": len(timings),
        "completed": len(done), "failed": len(timings) - len(done), "errors": errors[:5],
        # requests sent per second (n - 1 gaps): below `rate` when the load generator lags
        "achieved_rate": (len(timings) - 1) / sent_span if sent_span > 0 else math.inf,
        "completed_per_s": len(done) / span if span > 0 else math.nan,
        "duration_s": span, "input_tokens": sum(t.input_tokens for t in done),
        "output_tokens": tokens, "output_tokens_per_s": tokens / span if span > 0 else math.nan,
        "ttft_ms": pct([(t.responses[0] - t.sent) * 1e3 for t in done]),
        "itl_ms": pct([(t.responses[-1] - t.responses[0]) * 1e3 / (t.output_tokens - 1)
                       for t in done if t.output_tokens > 1]),
        "e2e_ms": pct([(t.responses[-1] - t.sent) * 1e3 for t in done]),
        "send_lag_ms": pct([(t.sent - t.scheduled) * 1e3 for t in timings]),
        "client_cpu_ms_per_request": cpu_seconds * 1e3 / len(timings),
    }


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
            axis.annotate(r["load"], (x, r[key]["p50"]), fontsize=8)
        axis.set(xlabel="output tokens/s", ylabel="ms", title=title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    parser.add_argument("--rates", default="2,8,32,inf", help="requests/s, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="requests per rate")
    parser.add_argument("--concurrency", default="",
                        help="closed-loop stream counts, comma-separated (after the rates)")
    parser.add_argument("--fixed-lengths", default=None, metavar="IN,OUT",
                        help="every request IN prompt words and OUT output tokens instead of "
                             "ShareGPT-shaped lengths (to compare with genai-perf's synthetic "
                             "prompts)")
    parser.add_argument("--metrics-url", default=None,
                        help="the server's metrics (default: port 8002 of the --url host)")
    parser.add_argument("--max-input-tokens", type=int, default=1024,
                        help="clip prompts to this (the server's --max-input-tokens)")
    parser.add_argument("--max-total-tokens", type=int, default=2048,
                        help="clip prompt + output to this (the server's --max-total-tokens)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="requests sent at once before the rates, not reported")
    parser.add_argument("--client", choices=("asyncio", "threads"), default="asyncio",
                        help="load generator: one event loop, or a blocking stream per thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write the latency-throughput plot (PNG)")
    parser.add_argument("--serve-llama3-8b", action="store_true",
                        help="serve a random-weight Llama-3-8B shape (GPU) and measure it")
    parser.add_argument("--stream-responses-per-second", type=int, default=None,
                        help="with --serve-llama3-8b: the server's response budget")
    args = parser.parse_args()
    if not 0 < args.max_input_tokens < args.max_total_tokens:
        parser.error("need 0 < --max-input-tokens < --max-total-tokens")
    server = serve_llama3_8b(args.stream_responses_per_second) if args.serve_llama3_8b else None
    if server is not None:
        args.url, args.metrics_url = server.grpc_url, server.metrics_url
    if args.metrics_url is None:
        args.metrics_url = f"http://{args.url.rsplit(':', 1)[0]}:8002/metrics"
    try:
        measure(args)
    finally:
        if server is not None:
            server.stop()


def serve_llama3_8b(responses_per_second: int | None):
    import tempfile

    from bench_throughput import engine_config
    from common import LLAMA3_8B, llama3_8b_dir, write_synthetic_tokenizer
    from server import TritonServer

    model_dir = llama3_8b_dir()
    write_synthetic_tokenizer(model_dir, LLAMA3_8B["vocab_size"])
    started = time.perf_counter()
    overrides = ({} if responses_per_second is None
                 else {"stream_responses_per_second": responses_per_second})
    server = TritonServer(engine_config(model_dir, **overrides), Path(tempfile.mkdtemp()),
                          startup_timeout=600)
    print(f"served a Llama-3-8B shape in {time.perf_counter() - started:.0f}s", flush=True)
    return server


def measure(args) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    if args.fixed_lengths:
        n_in, n_out = (int(n) for n in args.fixed_lengths.split(","))
        jobs = [(n_in, n_out)] * args.requests
    else:
        jobs = workload(args.requests, args.seed, args.max_input_tokens, args.max_total_tokens)
    texts = prompts(jobs, args.seed, synthetic_ids=args.serve_llama3_8b)
    settings = {"commit": commit, "url": args.url, "client": args.client,
                "requests_per_rate": args.requests, "seed": args.seed,
                "max_input_tokens": args.max_input_tokens,
                "max_total_tokens": args.max_total_tokens, "warmup_requests": args.warmup,
                "drawn_input_tokens": sum(n for n, _ in jobs),
                "drawn_output_tokens": sum(n for _, n in jobs)}
    print(f"bench_online: commit {commit or '?'}, {args.url}, {args.client} client, "
          f"{args.requests} requests per rate, {settings['drawn_input_tokens']} prompt words and "
          f"{settings['drawn_output_tokens']} output tokens each", flush=True)
    if args.warmup:
        run_rate(args.url, math.inf, texts[:args.warmup], jobs[:args.warmup], args.seed,
                 args.client)
    loads = [lambda rate=rate: run_rate(args.url, float(rate), texts, jobs, args.seed,
                                        args.client)
             for rate in args.rates.split(",") if rate]
    loads += [lambda n=n: run_concurrency(args.url, int(n), texts, jobs)
              for n in args.concurrency.split(",") if n]
    results = [with_server_steps(args.metrics_url, load) for load in loads]
    print_table("Online serving (streaming gRPC through the ensemble; latencies in ms)",
                ["load", "achieved req/s", "failed", "output tok/s", "TTFT p50", "TTFT p99",
                 "ITL p50", "ITL p99", "E2E p50", "E2E p99", "client CPU ms/req",
                 "server decode step", "mean batch", "ITL p50 / step", "server TTFT mean",
                 "server queue mean"],
                [[r["load"], r["achieved_rate"], r["failed"], r["output_tokens_per_s"],
                  r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], r["itl_ms"]["p50"],
                  r["itl_ms"]["p99"], r["e2e_ms"]["p50"], r["e2e_ms"]["p99"],
                  r["client_cpu_ms_per_request"], r["decode_step_ms"], r["decode_batch"],
                  r["itl_ms"]["p50"] / r["decode_step_ms"], r["server_ttft_mean_ms"],
                  r["server_queue_mean_ms"]] for r in results])
    for r in results:
        if r["failed"]:
            print(f"{r['load']}: {r['failed']} failed, e.g. {r['errors'][0]}")
    if args.json:
        args.json.write_text(json.dumps({**settings, "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


def with_server_steps(metrics_url: str, load) -> dict:
    """Runs load(); adds the server's mean decode step (ms) and batch size over the run (nan
    when its metrics cannot be read)."""
    def totals():
        try:
            text = read_metrics(metrics_url)
        except OSError:
            return None
        return (engine_steps(text).get("next_token", [0.0] * 4),
                histogram_totals(text, SERVER_LATENCIES))

    before = totals()
    result = load()
    time.sleep(1.0)  # the server publishes step metrics from a thread of its own
    after = totals()
    steps = seconds = sequences = 0.0
    means = {name: math.nan for name in SERVER_LATENCIES}
    if before is not None and after is not None:
        steps, seconds, _, sequences = (a - b for a, b in zip(after[0], before[0]))
        for name in SERVER_LATENCIES:
            total, count = (a - b for a, b in zip(after[1][name], before[1][name]))
            means[name] = 1e3 * total / count if count else math.nan
    result["decode_step_ms"] = 1e3 * seconds / steps if steps else math.nan
    result["decode_batch"] = sequences / steps if steps else math.nan
    result["server_ttft_mean_ms"] = means["textgen_time_to_first_token_seconds"]
    result["server_queue_mean_ms"] = means["tgi_request_queue_duration"]
    return result


if __name__ == "__main__":
    main()
