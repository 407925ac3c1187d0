"""Starting a real tritonserver on free loopback ports for e2e tests."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from textgen_backend.config import EngineConfig
from textgen_backend.cli.repository import render_repository
from textgen_backend.cli.tritonserver import find_tritonserver, server_command, start_tritonserver


def wait_until_ready(process: subprocess.Popen, http_port: int, timeout: float, log) -> None:
    """Waits for the ensemble to be ready on http_port; fails with log() if the process (a
    tritonserver, or a launcher running one) exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log()}")
        try:
            url = f"http://127.0.0.1:{http_port}/v2/models/ensemble/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server is not ready after {timeout}s:\n{log()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver serving `config`'s model from a repository rendered under `workdir`."""

    def __init__(self, config: EngineConfig, workdir: Path, startup_timeout: float = 300):
        self.repository = render_repository(config, workdir / "repository")
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = workdir / "tritonserver.log"
        command = server_command(find_tritonserver(), self.repository, "127.0.0.1",
                                 self.http_port, self.grpc_port, self.metrics_port)
        self._log = open(self.log_path, "w")
        self.process = start_tritonserver(command, self.repository, stdout=self._log,
                                          stderr=subprocess.STDOUT)
        self._wait_ready(startup_timeout)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _failure_lines(self) -> str:
        """The log's error lines (model load failures, tracebacks), else its tail."""
        lines = [line for line in self.log().splitlines()
                 if any(k in line for k in ("UNAVAILABLE", "Error", "error", "Traceback"))]
        return "\n".join(lines)[-8000:] or self.log()[-5000:]

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def _wait_ready(self, timeout: float) -> None:
        try:
            wait_until_ready(self.process, self.http_port, timeout, self._failure_lines)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class FrontEnd:
    """textgen_api in front of a TritonServer, on a free loopback port."""

    def __init__(self, server, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "textgen_api", "--triton-url", server.grpc_url,
             "--host", "127.0.0.1", "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/info", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # up (an API key refuses /info)
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(self.process.stdout.read())
                time.sleep(0.2)
        raise RuntimeError("the front end did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)
