#!/usr/bin/env python3
"""Serving benchmark against a running textgen server: genai-perf (default) or perf_analyzer
alone drive the `ensemble` over gRPC streaming; prints time to first token, inter-token latency
and output tokens/s.

    make bench-serving                      # genai-perf against localhost:8001 (make serve)
    .venv/bin/python bench/bench_serving.py --tool perf_analyzer --url localhost:8001

perf_analyzer is the binary in the tritonclient==2.51.0 wheel (.venv/bin). It links libb64 and
libcudart.so.12, which a plain machine lacks: the nvidia-pytriton wheel bundles both, so
symlinks to them in a private directory on LD_LIBRARY_PATH run it with no apt and no CUDA.
genai-perf wants numpy 2 while the server's venv keeps numpy<2 (the Python-backend stub), so
it lives in .venv-bench (make bench-tools), whose bin/ gets a perf_analyzer wrapper script:
genai-perf runs `perf_analyzer` from PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

LIBRARIES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def perf_analyzer_libraries() -> Path:
    """<venv>/lib/perf_analyzer with the two libraries perf_analyzer needs, linked from the
    nvidia-pytriton wheel (made once)."""
    bundled = Path(sysconfig.get_path("purelib")) / "nvidia_pytriton.libs"
    directory = Path(sys.prefix) / "lib" / "perf_analyzer"
    directory.mkdir(parents=True, exist_ok=True)
    for name, pattern in LIBRARIES.items():
        found = sorted(bundled.glob(pattern))
        if not found:
            raise FileNotFoundError(f"no {pattern} in {bundled}: is nvidia-pytriton installed?")
        link = directory / name
        if not link.exists():
            link.symlink_to(found[0])
    return directory


def install_perf_analyzer(bin_dir: Path) -> Path:
    """Writes bin_dir/perf_analyzer: the tritonclient wheel's binary with its libraries."""
    binary = Path(sys.prefix) / "bin" / "perf_analyzer"
    wrapper = bin_dir / "perf_analyzer"
    wrapper.write_text(
        "#!/bin/sh\n# perf_analyzer from tritonclient==2.51.0, libraries from nvidia-pytriton "
        "(bench/bench_serving.py)\n"
        f'LD_LIBRARY_PATH="{perf_analyzer_libraries()}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" '
        f'exec "{binary}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def run(command: list[str], env: dict | None = None) -> None:
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, env=env, check=True)


def genai_perf(args, artifacts: Path) -> dict[str, np.ndarray | float]:
    """Runs genai-perf; its own table goes to stdout. Returns our summary from its JSON."""
    install_perf_analyzer(Path(args.genai_perf).parent)
    endpoint = (["--endpoint-type", "kserve", "--backend", args.backend,
                 "--output-tokens-mean-deterministic"]
                if args.endpoint_type == "kserve" else
                # the REST front end's OpenAI route: genai-perf sends max_tokens, ignore_eos
                # (vLLM's extra field) makes every output exactly that long
                ["--endpoint-type", "chat", "--extra-inputs", "ignore_eos:true"])
    command = [args.genai_perf, "profile", "-m", args.model, *endpoint, "--streaming",
               "-u", args.url,
               "--tokenizer", args.tokenizer,
               "--synthetic-input-tokens-mean", str(args.input_tokens),
               "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", str(args.output_tokens),
               "--concurrency", str(args.concurrency),
               "--measurement-interval", str(args.measurement_interval),
               "--stability-percentage", "999", "--num-dataset-entries", "64",
               "--artifact-dir", str(artifacts)]
    env = {**os.environ, "PATH": f"{Path(args.genai_perf).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}"}
    run(command, env)
    export = json.loads(next(artifacts.glob("*/profile_export_genai_perf.json")).read_text())
    return {"requests": export["request_count"]["avg"],
            "input_tokens": export["input_sequence_length"]["avg"],
            "output_tokens": export["output_sequence_length"]["avg"],
            "ttft_ms": export["time_to_first_token"],
            "itl_ms": export["inter_token_latency"],
            "latency_ms": export["request_latency"],
            "tokens_per_second": export["output_token_throughput"]["avg"]}


def perf_analyzer(args, artifacts: Path) -> dict:
    """Runs perf_analyzer alone; token counts come from the responses' num_output_tokens."""
    prompt = " ".join(["hello"] * args.input_tokens)
    data = artifacts / "inputs.json"
    data.write_text(json.dumps({"data": [{
        "text_input": [prompt], "max_tokens": [args.output_tokens],
        "min_tokens": [args.output_tokens], "stream": [True]}]}))
    export = artifacts / "profile_export.json"
    command = [str(Path(sys.prefix) / "bin" / "perf_analyzer"), "-m", args.model, "-i", "grpc",
               "-u", args.url, "--streaming", "--input-data", str(data),
               "--concurrency-range", str(args.concurrency),
               "--measurement-interval", str(args.measurement_interval),
               "--stability-percentage", "999", "--profile-export-file", str(export)]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (str(perf_analyzer_libraries()), os.environ.get("LD_LIBRARY_PATH")) if p)}
    run(command, env)
    text = export.read_text()
    if not text.strip():  # seen on a loaded 2-core machine; genai-perf's words for it
        sys.exit(f"perf_analyzer left a zero-length, empty document at {export}")
    return summarize_profile(json.loads(text))


def summarize_profile(profile: dict) -> dict:
    """TTFT, ITL, latency and output tokens/s of a perf_analyzer profile export, computed as
    genai-perf does (ITL: (last response - first response) / (output tokens - 1))."""
    ttft, itl, latency, tokens = [], [], [], []
    inputs, starts, ends = [], [], []
    for request in profile["experiments"][0]["requests"]:
        times = request["response_timestamps"]
        outputs = [o for o in request["response_outputs"] if "num_output_tokens" in o]
        if not times or not outputs:
            continue
        generated = outputs[-1]["num_output_tokens"]
        start = request["timestamp"]
        ttft.append((times[0] - start) / 1e6)
        latency.append((times[-1] - start) / 1e6)
        if generated > 1:
            itl.append((times[-1] - times[0]) / 1e6 / (generated - 1))
        tokens.append(generated)
        inputs.append(outputs[-1]["num_input_tokens"])
        starts.append(start)
        ends.append(times[-1])
    if not tokens:
        raise RuntimeError("perf_analyzer recorded no complete request")
    return {"requests": len(tokens), "input_tokens": float(np.mean(inputs)),
            "output_tokens": float(np.mean(tokens)), "ttft_ms": _stats(ttft),
            "itl_ms": _stats(itl), "latency_ms": _stats(latency),
            "tokens_per_second": sum(tokens) / ((max(ends) - min(starts)) / 1e9)}


def _stats(values: list[float]) -> dict:
    array = np.array(values)
    return {"avg": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p99": float(np.percentile(array, 99))}


def print_summary(args, summary: dict) -> None:
    tool = f"genai-perf --backend {args.backend}" if args.tool == "genai-perf" else args.tool
    print(f"\ntextgen serving benchmark: {tool}, {args.model} at {args.url}, "
          f"concurrency {args.concurrency}")
    print(f"requests {summary['requests']:.0f}, input tokens {summary['input_tokens']:.1f}, "
          f"output tokens {summary['output_tokens']:.1f} (means)")
    print(f"{'metric':<28}{'avg':>10}{'p50':>10}{'p99':>10}")
    for label, key in (("time to first token (ms)", "ttft_ms"),
                       ("inter-token latency (ms)", "itl_ms"),
                       ("request latency (ms)", "latency_ms")):
        s = summary[key]
        print(f"{label:<28}{s['avg']:>10.2f}{s['p50']:>10.2f}{s['p99']:>10.2f}")
    print(f"{'output tokens/s':<28}{summary['tokens_per_second']:>10.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--tool", choices=("genai-perf", "perf_analyzer"), default="genai-perf")
    parser.add_argument("--backend", choices=("tensorrtllm", "vllm"), default="tensorrtllm",
                        help="genai-perf's input convention (tensors, or sampling_parameters)")
    parser.add_argument("--endpoint-type", choices=("kserve", "chat"), default="kserve",
                        help="genai-perf: the ensemble over gRPC, or the REST front end's "
                             "/v1/chat/completions (--url http://host:3000)")
    parser.add_argument("--genai-perf", default=".venv-bench/bin/genai-perf",
                        help="the genai-perf executable (make bench-tools installs it)")
    parser.add_argument("--tokenizer", help="genai-perf: a local tokenizer directory (the "
                                            "served model's)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--measurement-interval", type=int, default=10000,
                        help="milliseconds per measurement window")
    parser.add_argument("--artifact-dir", help="where the tools write (default: a temporary "
                                               "directory)")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--install-perf-analyzer", metavar="BIN_DIR",
                        help="only write the perf_analyzer wrapper into BIN_DIR")
    args = parser.parse_args(argv)
    if args.install_perf_analyzer:
        print(install_perf_analyzer(Path(args.install_perf_analyzer)))
        return 0
    if args.tool == "genai-perf" and not args.tokenizer:
        parser.error("genai-perf needs --tokenizer (the served model's directory)")
    artifacts = Path(args.artifact_dir or tempfile.mkdtemp(prefix="bench-serving-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    summary = (genai_perf if args.tool == "genai-perf" else perf_analyzer)(args, artifacts)
    print_summary(args, summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
