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
