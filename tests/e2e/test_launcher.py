"""textgen-launcher end to end: renders, serves, answers a streaming request, stops on Ctrl-C."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server import free_port, wait_until_ready
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e


def test_launcher_serves_and_stops_cleanly_on_ctrl_c(tiny_model_dir, tiny_reference, tmp_path):
    http, grpc, metrics = free_port(), free_port(), free_port()
    launcher = Path(sys.executable).parent / "textgen-launcher"
    env = {**os.environ, "MAX_TOTAL_TOKENS": "300", "MAX_INPUT_TOKENS": "250"}
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:  # a file, not a pipe nobody drains while it serves
        process = subprocess.Popen(
            [str(launcher), "--model-id", str(tiny_model_dir), "--hostname", "127.0.0.1",
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--model-repository", str(tmp_path / "repo")],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(process, http, 300, lambda: log_path.read_text()[-3000:])
        # The env var reached the engine config.
        assert '\\"max_total_tokens\\": 300' in (tmp_path / "repo/generator/config.pbtxt").read_text()
        client = TextgenClient(f"127.0.0.1:{grpc}")
        chunks = list(client.stream("The quick brown fox", max_tokens=12))
        client.close()
        expected = tiny_reference.greedy(tiny_reference.encode("The quick brown fox"), 12)
        assert [t for c in chunks for t in c.output_ids] == expected
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert process.wait(timeout=90) == 0
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
                 "--max-batch-prefill-tokens", "--http-port", "--model-repository"):
        assert flag in help_text
