"""textgen-launcher: render a model repository for a model and run tritonserver on it.

Flags follow TGI's text-generation-launcher (TGIS's TLS_* variables, LoRAX's --download-only);
each has an environment variable of the same name, and --help is laid out like TGI's.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from textgen_backend.config import EngineConfig, FlagHelpFormatter, add_flags, flag, from_flags
from textgen_backend.weights.download import download_weights
from textgen_backend.logs import configure_logging
from textgen_backend.cli.repository import render_repository
from textgen_backend.cli.runtime_env import runtime_environment
from textgen_backend.cli.tritonserver import (find_tritonserver, server_command, start_tritonserver,
                                              supervise, tls_options, tracing_options)

logger = logging.getLogger("textgen")


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = flag("Address to listen on.", default="0.0.0.0")
    http_port: int = flag("HTTP port (KServe v2 and the generate endpoints).", default=8000,
                          aliases=("-p", "--port"), env_aliases=("PORT",))
    grpc_port: int = flag("gRPC port.", default=8001)
    metrics_port: int = flag("Prometheus metrics port.", default=8002)
    tls_cert_path: str | None = flag("PEM certificate: gRPC is served over TLS (TGIS). HTTP and "
                                     "metrics stay plain: tritonserver has no TLS for them.")
    tls_key_path: str | None = flag("PEM private key of the TLS certificate.")
    tls_client_ca_cert_path: str | None = flag("PEM CA certificate: gRPC clients must present a "
                                               "certificate it signed (mutual TLS).")
    otlp_endpoint: str | None = flag("Export a trace of every request to this OpenTelemetry "
                                     "collector URL (OTLP over HTTP, e.g. "
                                     "http://collector:4318/v1/traces; Triton's tracing).")
    api_port: int = flag("Port of the REST front end beside tritonserver: OpenAI's /v1 "
                         "routes and TGI/LoRAX's (/, /generate, /generate_stream, /tokenize, "
                         "/info, /health); TGI's REST port. 0: none (also none with "
                         "--tls-cert-path: it calls gRPC in plain text).", default=3000)
    api_key: str | None = flag("Bearer token the REST front end requires on every route.")
    cors_allow_origin: str = flag("Comma-separated origins the REST front end allows (CORS).",
                                  default="")
    payload_limit: int = flag("Largest request body the REST front end accepts, in bytes.",
                              default=2_000_000)
    model_repository: str | None = flag("Where to render the model repository "
                                        "(default: a temporary directory).")
    drain_timeout_s: float = flag("On SIGINT/SIGTERM: seconds the requests in flight get to "
                                  "finish (new ones are refused) before the rest end with "
                                  "finish_reason \"cancelled\" and tritonserver stops.",
                                  default=30.0)
    download_only: bool = flag("Download --model-id into the Hugging Face cache (as `textgen "
                               "download-weights`) and exit.", default=False)

    def __post_init__(self):
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        tls_options(self.tls_cert_path, self.tls_key_path, self.tls_client_ca_cert_path)

    def tritonserver_options(self) -> list[str]:
        return (tls_options(self.tls_cert_path, self.tls_key_path, self.tls_client_ca_cert_path)
                + tracing_options(self.otlp_endpoint))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="textgen-launcher", usage="%(prog)s [OPTIONS]", formatter_class=FlagHelpFormatter,
        add_help=False,
        description="Text generation launcher: serves a Llama-family model with Triton Inference "
                    "Server.\nEvery option also reads the environment variables shown.")
    add_flags(parser, EngineConfig)
    add_flags(parser, ServerConfig)
    parser.add_argument("-e", "--env", action="store_true",
                        help="Print the runtime environment (versions, devices, tritonserver) "
                             "first; alone, print it and exit.")
    parser.add_argument("-h", "--help", action="help", help="Print help")
    parser.add_argument("-V", "--version", action="version",
                        version=f"%(prog)s {metadata.version('textgen')}", help="Print version")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        engine = from_flags(EngineConfig, args)
        server = from_flags(ServerConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(engine.json_output)
    if args.env:
        print(runtime_environment(), flush=True)
        if not engine.model_id:
            return 0
    if not engine.model_id:
        parser.error("--model-id is required (or set MODEL_ID)")
    if server.download_only:
        path = download_weights(engine.model_id, engine.revision,
                                cache_dir=engine.huggingface_hub_cache)
        logger.info("[textgen] downloaded %s to %s", engine.model_id, path)
        return 0
    if Path(engine.model_id).is_dir():  # the server's working directory may differ
        engine = dataclasses.replace(engine, model_id=str(Path(engine.model_id).resolve()))
    repository = Path(server.model_repository or tempfile.mkdtemp(prefix="textgen-repository-"))
    render_repository(engine, repository)
    command = server_command(find_tritonserver(), repository, server.hostname,
                             server.http_port, server.grpc_port, server.metrics_port)
    command += server.tritonserver_options()
    logger.info("[textgen] serving %s from %s", engine.model_id, repository)
    # tritonserver gets its own session: a terminal's Ctrl-C reaches the supervisor alone.
    process = start_tritonserver(command, repository, start_new_session=True)
    threading.Thread(target=_log_when_ready, args=(server, time.monotonic()), daemon=True).start()
    front_end = None
    if server.api_port and server.tls_cert_path:
        logger.warning("[textgen] no REST front end: it calls tritonserver over plain gRPC, and "
                       "--tls-cert-path makes gRPC TLS-only (--api-port is ignored)")
    elif server.api_port:
        front_end = _start_front_end(engine, server)
    try:
        code = supervise(process, repository, server.drain_timeout_s)
    finally:
        if front_end is not None:
            front_end.terminate()
            front_end.wait()
    logger.info("[textgen] tritonserver exited with code %d", code)
    return code


def _start_front_end(engine: EngineConfig, server: ServerConfig) -> subprocess.Popen:
    """textgen_api in a process of its own (the key through the environment, not argv)."""
    command = [sys.executable, "-m", "textgen_api", "--triton-url",
               f"127.0.0.1:{server.grpc_port}", "--host", server.hostname,
               "--port", str(server.api_port), "--model-name", engine.model_id,
               "--adapters", engine.adapter_id or "",
               "--cors-allow-origin", server.cors_allow_origin,
               "--payload-limit", str(server.payload_limit)]
    for option, value in (("--max-input-tokens", engine.max_input_tokens),
                          ("--max-total-tokens", engine.max_total_tokens)):
        if value is not None:  # /info reports them (the model's defaults are not known here)
            command += [option, str(value)]
    env = {**os.environ, "API_KEY": server.api_key or ""}
    logger.info("[textgen] REST front end (OpenAI, TGI) on port %d", server.api_port)
    # its own session too: the supervisor decides when it stops
    return subprocess.Popen(command, env=env, start_new_session=True)


def _log_when_ready(server: ServerConfig, started: float) -> None:
    """Logs how long tritonserver took to serve (the generator logs its load and warm-up)."""
    host = "127.0.0.1" if server.hostname in ("0.0.0.0", "::", "") else server.hostname
    url = f"http://{host}:{server.http_port}/v2/health/ready"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    logger.info("[textgen] tritonserver ready in %.1fs (model load and warm-up "
                                "included)", time.monotonic() - started)
                    return
        except OSError:
            pass
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
