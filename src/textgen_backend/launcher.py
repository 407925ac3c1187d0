"""textgen-launcher: render a model repository for a model and run tritonserver on it.

Flags follow TGI's text-generation-launcher; each has an environment variable of the same name.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from textgen_backend.config import EngineConfig, add_flags, flag, from_flags
from textgen_backend.repository import render_repository
from textgen_backend.tritonserver import find_tritonserver, server_command, server_environment

logger = logging.getLogger("textgen")


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = flag("Address to listen on.", default="0.0.0.0")
    http_port: int = flag("HTTP port (KServe v2 and the generate endpoints).", default=8000)
    grpc_port: int = flag("gRPC port.", default=8001)
    metrics_port: int = flag("Prometheus metrics port.", default=8002)
    model_repository: str | None = flag("Where to render the model repository "
                                        "(default: a temporary directory).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen-launcher",
        description="Serve a Llama-family model with Triton Inference Server.")
    add_flags(parser, EngineConfig)
    add_flags(parser, ServerConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        engine = from_flags(EngineConfig, args)
        server = from_flags(ServerConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    if not engine.model_id:
        parser.error("--model-id is required (or set MODEL_ID)")
    if Path(engine.model_id).is_dir():  # the server's working directory may differ
        engine = dataclasses.replace(engine, model_id=str(Path(engine.model_id).resolve()))
    repository = Path(server.model_repository or tempfile.mkdtemp(prefix="textgen-repository-"))
    render_repository(engine, repository)
    command = server_command(find_tritonserver(), repository, server.hostname,
                             server.http_port, server.grpc_port, server.metrics_port)
    logger.info("[textgen] serving %s from %s", engine.model_id, repository)
    # tritonserver gets its own session so that a terminal's Ctrl-C reaches it once, from here.
    process = subprocess.Popen(command, env=server_environment(), start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: process.send_signal(signum))
    return process.wait()


if __name__ == "__main__":
    sys.exit(main())
