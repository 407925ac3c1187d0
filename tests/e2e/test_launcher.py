"""textgen-launcher end to end: renders, serves, answers a streaming request, drains the requests
in flight on Ctrl-C and stops."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import http_generate, scrape_metrics
from server import free_port, wait_until_ready
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e


@dataclass
class Endpoints:
    http_url: str
    metrics_url: str
    api_url: str  # the REST front end's (OpenAI, TGI)


# Each engine step sleeps this long in the tests that stop the launcher with streams in
# flight: the tiny model alone makes 480 tokens in well under a second on the CPU, so a stream
# could end before Ctrl-C reached it (CI saw a "cancelled" stream finish with "length").
STEADY_STEPS = {"TEXTGEN_FAULT_INJECTION": "sleep%1:0.01"}


def _launch(model_dir, tmp_path, *flags, env_extra: dict | None = None
            ) -> tuple[subprocess.Popen, int, int, Endpoints, Path]:
    """textgen-launcher started as a user would, from a working directory holding a `kernels/`
    package that must not shadow Hugging Face's (transformers imports `kernels`)."""
    http, grpc, metrics, api = free_port(), free_port(), free_port(), free_port()
    launcher = Path(sys.executable).parent / "textgen-launcher"
    workdir = tmp_path / "cwd"
    (workdir / "kernels").mkdir(parents=True)
    (workdir / "kernels" / "__init__.py").write_text(
        "raise ImportError('the working directory shadowed the kernels package')\n")
    env = {**os.environ, "MAX_TOTAL_TOKENS": "512", "MAX_INPUT_TOKENS": "100",
           **(env_extra or {})}
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:  # a file, not a pipe nobody drains while it serves
        process = subprocess.Popen(
            [str(launcher), "--model-id", str(model_dir), "--hostname", "127.0.0.1",
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--api-port", str(api), "--model-repository", str(tmp_path / "repo"), *flags],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    try:
        wait_until_ready(process, http, 300, lambda: log_path.read_text()[-3000:])
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    return (process, grpc, http, Endpoints(f"http://127.0.0.1:{http}",
                                           f"http://127.0.0.1:{metrics}/metrics",
                                           f"http://127.0.0.1:{api}"), log_path)


def _streams_in_flight_at_ctrl_c(process, grpc, endpoints, max_tokens):
    """A gRPC stream and an HTTP generate_stream generating when Ctrl-C reaches the launcher;
    returns each one's final chunk, the launcher's exit code and how long it took to exit."""
    finals = {}

    def http_stream():
        events = http_generate(endpoints, {"text_input": "Hello world", "max_tokens": max_tokens,
                                           "ignore_eos": True, "stream": True}, stream=True)
        finals["http"] = events[-1]

    def grpc_stream():
        client = TextgenClient(f"127.0.0.1:{grpc}")
        chunks = list(client.stream("The quick brown fox", max_tokens=max_tokens,
                                    ignore_eos=True))
        client.close()
        finals["grpc"] = (chunks[-1].finish_reason, sum(len(c.output_ids) for c in chunks))

    threads = [threading.Thread(target=f) for f in (http_stream, grpc_stream)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while scrape_metrics(endpoints).get("textgen_num_requests_running", 0) < 2:
        assert time.monotonic() < deadline, "the two streams never ran together"
        time.sleep(0.02)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code = process.wait(timeout=120)
    for thread in threads:
        thread.join(timeout=30)
    return finals, code, time.monotonic() - started


def _tritonservers_of(repository: Path) -> str:
    listing = subprocess.run(["pgrep", "-af", "tritonserver"], capture_output=True, text=True)
    return "\n".join(l for l in listing.stdout.splitlines() if str(repository) in l)


def _overload(grpc: int, requests: int) -> int:
    """`requests` concurrent generations; returns how many were refused as overloaded."""
    refused = []
    # Every client connects before any sends, so that all are sent within moments while the
    # admitted ones generate: the count does not depend on thread start-up.
    all_connected = threading.Barrier(requests)

    def one():
        client = TextgenClient(f"127.0.0.1:{grpc}")
        all_connected.wait()
        try:
            client.generate("Hello", max_tokens=40)
        except Exception as exc:  # noqa: BLE001 - the refusal is what is counted
            refused.append("overloaded" in str(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(refused), "a request failed for another reason than overload"
    return len(refused)


def test_launcher_drains_streams_in_flight_on_ctrl_c(tiny_model_dir, tiny_reference, tmp_path):
    process, grpc, http, endpoints, log_path = _launch(tiny_model_dir, tmp_path,
                                                       "--max-concurrent-requests", "8",
                                                       env_extra=STEADY_STEPS)
    try:
        # An overload episode first: refused requests must leave nothing in flight that would
        # hold up the stop below.
        assert _overload(grpc, 40) >= 20
        # The env var reached the engine config.
        assert '\\"max_total_tokens\\": 512' in (tmp_path / "repo/generator/config.pbtxt").read_text()
        client = TextgenClient(f"127.0.0.1:{grpc}")
        chunks = list(client.stream("The quick brown fox", max_tokens=12))
        client.close()
        expected = tiny_reference.greedy(tiny_reference.encode("The quick brown fox"), 12)
        assert [t for c in chunks for t in c.output_ids] == expected
        # the launcher's REST front end serves the same model (TGI's route here)
        request = urllib.request.Request(
            f"{endpoints.api_url}/generate", json.dumps({"inputs": "The quick brown fox",
                                                         "parameters": {"max_new_tokens": 12,
                                                                        "details": True}}).encode(),
            {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert [t["id"] for t in answer["details"]["tokens"]] == expected
        info = json.loads(urllib.request.urlopen(f"{endpoints.api_url}/info", timeout=10).read())
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (100, 512)
        finals, code, seconds = _streams_in_flight_at_ctrl_c(process, grpc, endpoints, 400)
        assert code == 0, log_path.read_text()[-3000:]
        # Both streams ran to their end: the drain let them finish before tritonserver stopped.
        assert finals["grpc"] == ("length", 400)
        assert finals["http"]["finish_reason"] == "length"
        assert finals["http"]["num_output_tokens"] == 400
        assert seconds < 30
        assert not _tritonservers_of(tmp_path / "repo")
        with pytest.raises(OSError):  # the front end stopped with it
            urllib.request.urlopen(f"{endpoints.api_url}/info", timeout=2)
        log = log_path.read_text()
        assert "draining" in log and "tritonserver ready in" in log and "warm-up" in log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_launcher_cancels_what_outlives_the_drain_timeout(tiny_model_dir, tmp_path):
    process, grpc, http, endpoints, log_path = _launch(tiny_model_dir, tmp_path,
                                                       "--drain-timeout-s", "0",
                                                       env_extra=STEADY_STEPS)
    try:
        finals, code, seconds = _streams_in_flight_at_ctrl_c(process, grpc, endpoints, 480)
        assert code == 0, log_path.read_text()[-3000:]
        # A final response each, with finish_reason "cancelled", before tritonserver stopped.
        assert finals["grpc"][0] == "cancelled" and finals["grpc"][1] < 480
        assert finals["http"]["finish_reason"] == "cancelled"
        assert seconds < 30
        assert not _tritonservers_of(tmp_path / "repo")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_launcher_rejects_bad_flags():
    launcher = Path(sys.executable).parent / "textgen-launcher"
    result = subprocess.run([str(launcher), "--model-id", "x", "--dtype", "int3"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "argument --dtype" in result.stderr and "int3" in result.stderr
    help_text = subprocess.run([str(launcher), "--help"], capture_output=True, text=True).stdout
    for flag in ("--max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", "--waiting-served-ratio",
                 "--max-batch-prefill-tokens", "--http-port", "--model-repository", "--api-port",
                 "--api-key", "--cors-allow-origin", "--speculate", "--speculative-tokens"):
        assert flag in help_text
