"""The engine runs in a child process of the generator's stub (serving/engine_process.py): its
death fails the requests in flight with an error that says so, then stops tritonserver (with
--no-exit-on-engine-failure it refuses new ones instead: tests/e2e/test_faults_server.py); a
killed server leaves no engine process behind."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import _serve, kill_mid_stream, processes_under, wait_until
from textgen_client import TextgenClient

pytestmark = pytest.mark.e2e


def engine_processes(server_pid: int) -> list[int]:
    """The engine processes under a tritonserver (its stubs' spawned children)."""
    return processes_under(server_pid, b"multiprocessing.spawn")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def server(tiny_model_dir, tmp_path_factory):
    yield from _serve(tmp_path_factory, "engine-process", model_id=str(tiny_model_dir),
                      max_input_tokens=100, max_total_tokens=512)


def test_engine_death_fails_requests_in_flight_then_stops_the_server(server):
    """exit_on_engine_failure (the default): the stream gets the cause, then tritonserver is
    told to stop, so its readiness turns false and it exits for an orchestrator to restart."""
    [engine] = engine_processes(server.process.pid)
    kill_mid_stream(server, engine, "engine process exited")
    assert "stopping tritonserver so that it is restarted" in server.log()


def test_ctrl_c_or_sigterm_to_the_engine_process_leaves_its_work_alone(server):
    """Ctrl-C in the terminal that runs tritonserver signals every process of its group; the
    engine's shutdown is the generator's call (it drains first)."""
    [engine] = engine_processes(server.process.pid)
    client = TextgenClient(server.grpc_url)
    try:
        chunks = client.stream("The quick brown fox", max_tokens=60, ignore_eos=True)
        first = next(chunks)
        os.kill(engine, signal.SIGINT)
        os.kill(engine, signal.SIGTERM)
        rest = list(chunks)
    finally:
        client.close()
    assert rest[-1].finish_reason == "length"
    assert sum(len(c.output_ids) for c in [first, *rest]) == 60
    assert _alive(engine)


def test_a_killed_server_leaves_no_engine_process(server):
    [engine] = engine_processes(server.process.pid)
    assert _alive(engine)
    server.process.kill()
    server.process.wait()
    assert wait_until(lambda: not _alive(engine), timeout=30), "the engine process outlived its server"
