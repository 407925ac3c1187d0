"""The container image (deploy/Dockerfile), built by the README's `make image` and run as
docs/deployment.md shows: the launcher as a non-root user on a read-only root filesystem, and
plain tritonserver on a read-only rendered repository; each answers token-exact, and a stop
drains to a clean exit. Also the README's Deploy commands for Kubernetes: rendered, since no
cluster runs here (`kubectl apply -k DIR` is checked as `kubectl kustomize DIR`).

Needs docker or podman (.ci/container_engine.sh sets podman up on CI's machine); skipped without
one unless TEXTGEN_REQUIRE_CONTAINER is set, as in CI, where it fails instead."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import readme_block
from server import free_port
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
IMAGE = "textgen:cpu"
PROMPT = "The quick brown fox"


def _engine() -> str | None:
    if shutil.which("docker") and subprocess.run(["docker", "info"],
                                                 capture_output=True).returncode == 0:
        return "docker"
    return "podman" if shutil.which("podman") else None


def _run(command: list[str] | str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # pip inside the build trusts what the host trusts (a TLS-inspecting proxy's CA too)
    env.setdefault("PIP_CERT", ssl.get_default_verify_paths().cafile or "")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            shell=isinstance(command, str), **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def engine():
    found = _engine()
    if found is None:
        if os.environ.get("TEXTGEN_REQUIRE_CONTAINER"):
            pytest.fail("no docker daemon and no podman (bash .ci/container_engine.sh)")
        pytest.skip("no docker daemon and no podman")
    for line in readme_block("make image"):  # `make image` builds IMAGE
        if line.startswith("kubectl apply -k "):
            _run(["kubectl", "kustomize", line.split()[-1]])
        else:
            _run(line, timeout=1800)
    return found


@pytest.fixture
def readable_model(tiny_model_dir, tmp_path):
    """The tiny model where the container's user (uid 1000) can read it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for path in [tmp_path, *model.rglob("*"), model]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model


@contextmanager
def container(engine: str, mounts: dict[Path, str], args: list[str], http_port: int,
              entrypoint: str | None = None):
    name = f"textgen-test-{uuid.uuid4().hex[:8]}"
    command = [engine, "run", "-d", "--name", name, "--network", "host", "--read-only",
               "--tmpfs", "/tmp", "--shm-size", "1g"]
    for source, target in mounts.items():
        command += ["-v", f"{source}:{target}:ro"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    _run(command + [IMAGE] + args)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready",
                                            timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            state = subprocess.run([engine, "inspect", "-f", "{{.State.Running}}", name],
                                   capture_output=True, text=True).stdout.strip()
            if state != "true" or time.monotonic() > deadline:
                logs = subprocess.run([engine, "logs", name], capture_output=True, text=True)
                pytest.fail(f"the container is not ready ({state}):\n{logs.stdout[-4000:]}"
                            f"{logs.stderr[-4000:]}")
            time.sleep(1)
        yield name
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True)


def _stop(engine: str, name: str) -> int:
    """SIGTERM, as Kubernetes sends it; the container's exit code."""
    _run([engine, "stop", "-t", "90", name], timeout=120)
    return int(_run([engine, "inspect", "-f", "{{.State.ExitCode}}", name]).stdout.strip())


def _greedy_over_grpc(grpc_port: int) -> list[int]:
    client = TextgenClient(f"127.0.0.1:{grpc_port}")
    try:
        return client.generate(PROMPT, max_tokens=12, ignore_eos=True).output_ids
    finally:
        client.close()


def test_the_launcher_serves_as_a_non_root_user_on_a_read_only_root(engine, readable_model,
                                                                    tiny_reference):
    http, grpc, metrics, api = (free_port() for _ in range(4))
    expected = tiny_reference.greedy(tiny_reference.encode(PROMPT), 12)
    args = ["--model-id", "/models/tiny", "--dtype", "float32", "--max-input-tokens", "100",
            "--max-total-tokens", "160", "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", str(metrics), "--api-port", str(api)]
    with container(engine, {readable_model: "/models/tiny"}, args, http) as name:
        assert _greedy_over_grpc(grpc) == expected
        body = json.dumps({"inputs": PROMPT, "parameters": {
            "max_new_tokens": 12, "details": True, "ignore_eos_token": True}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{api}/generate", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            details = json.loads(response.read())["details"]
        assert [t["id"] for t in details["tokens"]] == expected  # the REST front end (TGI's)
        assert _run([engine, "exec", name, "id", "-u"]).stdout.strip() == "1000"
        assert _stop(engine, name) == 0   # the launcher drained and tritonserver exited cleanly


def test_plain_tritonserver_serves_a_read_only_repository(engine, readable_model, tiny_reference,
                                                          tmp_path):
    repository = tmp_path / "repository"
    _run([sys.executable, "build.py", "--model-id", "/models/tiny", "--dtype", "float32",
          "--max-input-tokens", "100", "--max-total-tokens", "160", "--output", str(repository)])
    for path in [repository, *repository.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    http, grpc, metrics = (free_port() for _ in range(3))
    args = ["--model-repository=/repository", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={metrics}"]
    mounts = {readable_model: "/models/tiny", repository: "/repository"}
    with container(engine, mounts, args, http, entrypoint="tritonserver") as name:
        assert _greedy_over_grpc(grpc) == tiny_reference.greedy(tiny_reference.encode(PROMPT), 12)
        assert _stop(engine, name) == 0


def test_the_readme_deploy_block_is_what_this_file_runs():
    lines = readme_block("make image")
    assert lines[0] == "make image"
    assert all(shlex.split(line)[0] in ("make", "kubectl") for line in lines)
