"""Finding a tritonserver binary and starting it so its Python stubs import our package.

tritonserver on PATH wins (e.g. NVIDIA's container); otherwise the one inside the
`nvidia-pytriton` wheel (installed --no-deps), whose Python backend needs the stub for the
running interpreter copied in from python_backend_stubs/<version>/.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from textgen_backend.config import default_cache_root
from textgen_backend.parallel import MULTICAST_OFF
from textgen_backend.serving.drain import DrainFiles

logger = logging.getLogger("textgen")

# After the drain: time for tritonserver to unload the models and close its endpoints before its
# process group is killed.
EXIT_GRACE_S = 20.0


@dataclass(frozen=True)
class TritonServerInstall:
    binary: Path
    backend_dir: Path | None   # None: tritonserver's default (/opt/tritonserver/backends)


def find_tritonserver() -> TritonServerInstall:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonServerInstall(Path(on_path), None)
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no tritonserver on PATH and the nvidia-pytriton wheel is not "
                                "installed (make install sets it up)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    _install_python_stub(root)
    return TritonServerInstall(root / "bin" / "tritonserver", root / "backends")


def _install_python_stub(root: Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not source.exists():
        raise FileNotFoundError(f"the nvidia-pytriton wheel has no Python-backend stub for "
                                f"Python {version}")
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver needs for the stubs to import this interpreter's packages:
    the virtualenv activated, the interpreter's own libpython first on LD_LIBRARY_PATH, no
    working directory on sys.path (PYTHONSAFEPATH: a folder there named like a package, e.g. a
    `kernels/` beside the user, would shadow it), and Triton's compiled-kernel cache under the
    textgen cache so that a second start does not compile again; NVLink multicast off for
    the shards' NCCL (parallel/__init__.py)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONSAFEPATH"] = "1"
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    env.setdefault("TRITON_CACHE_DIR", str(default_cache_root() / "triton-kernels"))
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def server_command(install: TritonServerInstall, repository: Path, hostname: str,
                   http_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    command = [str(install.binary), f"--model-repository={repository}",
               f"--http-address={hostname}", f"--http-port={http_port}",
               f"--grpc-address={hostname}", f"--grpc-port={grpc_port}",
               f"--metrics-address={hostname}", f"--metrics-port={metrics_port}",
               "--allow-metrics=true"]
    if install.backend_dir is not None:
        command.append(f"--backend-directory={install.backend_dir}")
    return command


def start_tritonserver(command: list[str], repository: Path, **popen_kwargs) -> subprocess.Popen:
    """Runs `command` (server_command's) with server_environment(), in the model repository as
    working directory: the stubs then never see the caller's directory on their path."""
    return subprocess.Popen(command, env=server_environment(), cwd=repository, **popen_kwargs)


def supervise(process: subprocess.Popen, repository: Path, drain_timeout_s: float) -> int:
    """Waits for tritonserver (started in a session of its own) to exit; returns its exit code.
    On SIGINT or SIGTERM: the generator drains (drain.py) for up to drain_timeout_s, then
    tritonserver gets the signal, and its process group is killed if it is still alive
    EXIT_GRACE_S later. A second signal skips what is left of the drain."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while process.poll() is None and not received:
        time.sleep(0.1)
    if process.poll() is not None:
        return process.returncode
    drain = DrainFiles(repository / "generator")
    if drain.directory.is_dir():
        logger.info("[textgen] draining: %.0fs for the requests in flight; new ones are refused",
                    drain_timeout_s)
        drain.request(drain_timeout_s)
        deadline = time.monotonic() + drain_timeout_s + 5  # the generator cancels at its own
        while (process.poll() is None and len(received) == 1 and not drain.is_drained()
               and time.monotonic() < deadline):
            time.sleep(0.1)
    if process.poll() is None:
        process.send_signal(received[0])
    try:
        return process.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        logger.warning("[textgen] tritonserver is still running %.0fs after the signal: killing "
                       "its process group", EXIT_GRACE_S)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 128 + signal.SIGKILL


def run_tritonserver(args: list[str], drain_timeout_s: float) -> int:
    """`textgen tritonserver ARGS`: tritonserver with ARGS, the environment, backend directory
    and working directory that our models need, supervised as the launcher does."""
    install = find_tritonserver()
    command = [str(install.binary), *args]
    if install.backend_dir is not None and not any(a.startswith("--backend-directory")
                                                   for a in args):
        command.append(f"--backend-directory={install.backend_dir}")
    repository = _model_repository_argument(args)
    process = start_tritonserver(command, repository, start_new_session=True)
    return supervise(process, repository, drain_timeout_s)


def _model_repository_argument(args: list[str]) -> Path:
    for i, arg in enumerate(args):
        for flag in ("--model-repository", "--model-store"):
            if arg.startswith(flag + "="):
                return Path(arg.split("=", 1)[1]).resolve()
            if arg == flag and i + 1 < len(args):
                return Path(args[i + 1]).resolve()
    raise ValueError("give --model-repository DIR (tritonserver's flag)")


def tls_options(cert_path: str | None, key_path: str | None,
                client_ca_cert_path: str | None) -> list[str]:
    """tritonserver's gRPC SSL options for TGIS's TLS_CERT_PATH / TLS_KEY_PATH /
    TLS_CLIENT_CA_CERT_PATH (mutual TLS with the last). HTTP and metrics stay plain: tritonserver
    has no TLS for them."""
    if not cert_path and not key_path:
        if client_ca_cert_path:
            raise ValueError("--tls-client-ca-cert-path needs --tls-cert-path and --tls-key-path")
        return []
    if not (cert_path and key_path):
        raise ValueError("give both --tls-cert-path and --tls-key-path (TLS_CERT_PATH, "
                         "TLS_KEY_PATH)")
    for path in (cert_path, key_path, client_ca_cert_path):
        if path and not Path(path).is_file():
            raise ValueError(f"TLS file {path} does not exist")
    options = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert_path}",
               f"--grpc-server-key={key_path}"]
    if client_ca_cert_path:
        options += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={client_ca_cert_path}"]
    return options


def tracing_options(otlp_endpoint: str | None) -> list[str]:
    """Triton's OpenTelemetry tracing of every request, exported over OTLP/HTTP."""
    if not otlp_endpoint:
        return []
    return ["--trace-config=mode=opentelemetry", "--trace-config=level=TIMESTAMPS",
            "--trace-config=rate=1", f"--trace-config=opentelemetry,url={otlp_endpoint}",
            "--trace-config=opentelemetry,resource=service.name=textgen"]
