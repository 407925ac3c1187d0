"""What the REST front end costs: the same closed-loop streams sent to the ensemble directly
over gRPC (asyncio tritonclient) and through textgen_api's OpenAI route (`/v1/completions`,
`stream: true`, server-sent events over HTTP), one after the other against one server. Prints
output tok/s and TTFT / inter-token latency p50 for both, and the ratio (issue 19: >= 95% of
the direct throughput at 256 streams, <= 2 ms added to median TTFT).

    python bench/bench_api.py --grpc-url localhost:8001 --api-url http://localhost:3000
    python bench/bench_api.py --serve-llama3-8b            # on the GPU machine: starts both
    python bench/bench_api.py --serve-tiny --streams 8     # the CPU smoke run (CI)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import print_table

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


async def _direct(url: str, streams: int, requests: int, tokens: int) -> list[tuple]:
    from textgen_client.aio import AsyncTextgenClient

    client = AsyncTextgenClient(url)
    timings = []

    async def worker(count: int):
        for _ in range(count):
            sent, stamps = time.perf_counter(), []
            async for chunk in client.stream([PROMPT], max_tokens=tokens, ignore_eos=True,
                                             stream=True):
                if chunk.output_ids:
                    stamps.append((time.perf_counter(), len(chunk.output_ids)))
            timings.append((sent, stamps))

    await asyncio.gather(*[worker(requests // streams) for _ in range(streams)])
    await client.close()
    return timings


async def _front_end(url: str, streams: int, requests: int, tokens: int) -> list[tuple]:
    import aiohttp

    payload = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
               "stream": True}
    timings = []
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def worker(count: int):
            for _ in range(count):
                sent, stamps = time.perf_counter(), []
                async with session.post(f"{url}/v1/completions", json=payload) as response:
                    response.raise_for_status()
                    async for line in response.content:
                        if line.startswith(b"data: {"):
                            if json.loads(line[6:])["choices"][0]["text"]:
                                stamps.append((time.perf_counter(), 1))
                timings.append((sent, stamps))

        await asyncio.gather(*[worker(requests // streams) for _ in range(streams)])
    return timings


def summarize(name: str, timings: list[tuple], seconds: float, tokens: int) -> dict:
    """Every request makes exactly `tokens` tokens (ignore_eos); ITL as genai-perf's: (last -
    first) / (tokens - 1) per request."""
    ttft = [1e3 * (stamps[0][0] - sent) for sent, stamps in timings if stamps]
    itl = [1e3 * (stamps[-1][0] - stamps[0][0]) / (tokens - 1) for _, stamps in timings
           if stamps and tokens > 1]
    return {"path": name, "requests": len(timings), "seconds": seconds,
            "tokens": tokens * len(timings), "ttft_p50": float(np.median(ttft)),
            "itl_p50": float(np.median(itl)) if itl else 0.0}


def measure(grpc_url: str, api_url: str, streams: int, requests: int, tokens: int) -> list[dict]:
    asyncio.run(_direct(grpc_url, min(streams, 4), min(streams, 4) * 2, 8))  # warm-up
    results = []
    for name, run, url in (("gRPC, direct", _direct, grpc_url),
                           ("HTTP, front end (/v1/completions)", _front_end, api_url)):
        started = time.perf_counter()
        timings = asyncio.run(run(url, streams, requests, tokens))
        results.append(summarize(name, timings, time.perf_counter() - started, tokens))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-url", default="localhost:8001")
    parser.add_argument("--api-url", default="http://localhost:3000")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--requests", type=int, default=None, help="default 4 per stream")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    served = parser.add_mutually_exclusive_group()
    served.add_argument("--serve-llama3-8b", action="store_true",
                        help="start a Llama-3-8B-shape server (random weights) and a front end")
    served.add_argument("--serve-tiny", action="store_true",
                        help="start the tests' tiny model and a front end (CPU smoke run)")
    args = parser.parse_args()
    requests = args.requests or 4 * args.streams
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    server = front_end = None
    try:
        if args.serve_llama3_8b or args.serve_tiny:
            server, front_end, grpc_url, api_url = _serve(args.serve_tiny)
        else:
            grpc_url, api_url = args.grpc_url, args.api_url
        results = measure(grpc_url, api_url, args.streams, requests, args.tokens)
    finally:
        if front_end is not None:
            front_end.terminate()
        if server is not None:
            server.stop()
    direct = results[0]
    rows = []
    for r in results:
        tps = r["tokens"] / r["seconds"]
        rows.append([r["path"], r["requests"], f"{tps:,.0f}",
                     f"{100 * tps / (direct['tokens'] / direct['seconds']):.0f}%",
                     f"{r['ttft_p50']:.1f}", f"{r['ttft_p50'] - direct['ttft_p50']:+.1f}",
                     f"{r['itl_p50']:.2f}"])
    print(f"commit {commit or 'unknown'}")
    print_table(f"The front end's cost: {args.streams} closed-loop streams, {args.tokens} output "
                "tokens each", ["path", "requests", "output tok/s", "of direct", "TTFT p50 ms",
                                "vs direct ms", "ITL p50 ms"], rows)


def _serve(tiny: bool):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from server import TritonServer, free_port
    from textgen_backend.config import EngineConfig

    if tiny:
        from tiny_models import build_tiny_model
        model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama")
        server = TritonServer(EngineConfig(model_id=str(model_dir), max_input_tokens=100,
                                           max_total_tokens=256, max_concurrent_requests=512),
                              Path(tempfile.mkdtemp()))
    else:
        from bench_online import serve_llama3_8b
        server = serve_llama3_8b(None)
    port = free_port()
    front_end = subprocess.Popen([sys.executable, "-m", "textgen_api", "--triton-url",
                                  server.grpc_url, "--host", "127.0.0.1", "--port", str(port)])
    api_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            import urllib.request
            urllib.request.urlopen(f"{api_url}/info", timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    return server, front_end, server.grpc_url, api_url


if __name__ == "__main__":
    main()
