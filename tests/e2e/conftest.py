"""Session-wide tritonservers for the e2e tests, and the transformers reference."""
from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from server import TritonServer
from textgen_backend.config import EngineConfig
from textgen_client import TextgenClient, TextgenError
from tiny_models import build_tiny_model


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(containing: str) -> list[str]:
    """The command lines of the README's ```bash block that contains `containing`."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    [block] = [b for b in blocks if containing in b]
    return [line for line in block.splitlines() if line.strip()]


class Reference:
    """transformers in float32 on the CPU: the oracle for greedy token ids."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
        out = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                  do_sample=False, **kwargs)
        return out[0, len(prompt_ids):].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V]: log_softmax of the logits at each position (predicting the next)."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    return Reference(tiny_model_dir)


def _serve(tmp_path_factory, name, **config):
    # float32 on a GPU too, where the default would be bfloat16: parity is token-exact.
    server = TritonServer(EngineConfig(dtype="float32", **config), tmp_path_factory.mktemp(name))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    yield from _serve(tmp_path_factory, "tiny-server", model_id=str(tiny_model_dir),
                      max_input_tokens=200, max_total_tokens=256, max_concurrent_requests=64)


@pytest.fixture(scope="session")
def small_kv_server(tiny_model_dir, tmp_path_factory):
    """A KV cache of 320 tokens in blocks of 4: 16 concurrent requests force preemption."""
    yield from _serve(tmp_path_factory, "small-kv-server", model_id=str(tiny_model_dir),
                      max_input_tokens=100, max_total_tokens=160, max_batch_total_tokens=320,
                      block_size=4, max_concurrent_requests=16)


@pytest.fixture(scope="session")
def demo_model_dir():
    from textgen_backend.weights.demo_model import ensure_demo_model
    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_reference(demo_model_dir):
    return Reference(demo_model_dir)


@pytest.fixture(scope="session")
def demo_server(demo_model_dir, tmp_path_factory):
    yield from _serve(tmp_path_factory, "demo-server", model_id=str(demo_model_dir),
                      max_total_tokens=1024)


@pytest.fixture
def client_for():
    clients = []

    def make(server):
        clients.append(TextgenClient(server.grpc_url))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def generate_rows(client, prompts: list[str], per_row: dict[str, list[str]],
                  **params) -> list[list[int]]:
    """One request, one row per prompt; per_row gives string inputs row by row (adapter_id,
    prefix_id), params are shared. Output ids in prompt order."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from textgen_client.client import build_inputs

    inputs = build_inputs(prompts, **params)
    for name, values in per_row.items():
        array = np.array([[v.encode()] for v in values], dtype=np.object_)
        inputs.append(grpcclient.InferInput(name, list(array.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(array)
    results: dict[int, list[int]] = {}
    for chunk in client.stream_inputs(inputs):
        results.setdefault(chunk.batch_index, []).extend(chunk.output_ids)
    return [results[i] for i in range(len(prompts))]


def scrape_metrics(server) -> dict[str, float]:
    """{'name{labels}': value} from the server's Prometheus endpoint."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    metrics = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            metrics[match.group(1)] = float(match.group(2))
    return metrics


def settled_metrics(server, timeout: float = 10.0) -> dict[str, float]:
    """A scrape once two in a row agree: the models publish metrics on threads of their own, a
    moment after the responses."""
    previous = scrape_metrics(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        current = scrape_metrics(server)
        if current == previous:
            return current
        previous = current
    raise AssertionError("the metrics did not settle")


def metric(server, name: str) -> float:
    values = [v for k, v in scrape_metrics(server).items() if k == name or k.startswith(name + "{")]
    assert len(values) == 1, f"metric {name} not exported once: {values}"
    return values[0]


def http_post(server, payload: dict, stream: bool = False) -> tuple[int, list[dict]]:
    """(status, JSON bodies): generate_stream's SSE events, else the one JSON body (also what
    generate_stream answers to a request Triton refuses before it starts the stream)."""
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"{server.http_url}/v2/models/ensemble/{endpoint}",
                                     data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    if not (stream and body.startswith("data: ")):
        return status, [json.loads(body)]
    return status, [json.loads(line[len("data: "):]) for line in body.splitlines()
                    if line.startswith("data: ")]


def http_generate(server, payload: dict, stream: bool = False):
    """POST to Triton's generate / generate_stream endpoint; returns the JSON (or SSE events),
    or {"error", "status"} when it is refused."""
    status, bodies = http_post(server, payload, stream)
    if status >= 400:
        return {"error": bodies[0]["error"], "status": status}
    return bodies if stream else bodies[0]


def deltas_once_equal(server, before: dict, expected: dict, timeout: float = 15.0) -> dict:
    """The expected metrics' changes since `before`, once they match (updates are published on
    the models' metrics threads, a moment after the responses) or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        after = scrape_metrics(server)
        got = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in expected}
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def processes_under(server_pid: int, marker: bytes) -> list[int]:
    """The processes below a tritonserver (at any depth) whose command line holds `marker`."""
    found, pending = [], [server_pid]
    while pending:
        parent = pending.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if ppid == parent:
                pending.append(int(stat.parent.name))
                if marker in cmdline:
                    found.append(int(stat.parent.name))
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def kill_mid_stream(server, pid: int, error: str) -> None:
    """SIGKILLs `pid` while a stream generates: the stream must fail with `error` (a regex) and
    tritonserver stop (--exit-on-engine-failure)."""
    client = TextgenClient(server.grpc_url)
    try:
        chunks = client.stream("The quick brown fox", max_tokens=400, ignore_eos=True)
        next(chunks)                                   # generating now
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TextgenError, match=error):
            for _ in chunks:
                pass
    finally:
        client.close()
    assert wait_until(lambda: not server.is_alive(), timeout=90), "tritonserver did not stop"
