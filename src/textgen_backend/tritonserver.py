"""Finding a tritonserver binary and starting it so its Python stubs import our package.

tritonserver on PATH wins (e.g. NVIDIA's container); otherwise the one inside the
`nvidia-pytriton` wheel (installed --no-deps), whose Python backend needs the stub for the
running interpreter copied in from python_backend_stubs/<version>/.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


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
    the virtualenv activated and the interpreter's own libpython first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
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
