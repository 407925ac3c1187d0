"""Imports only go down the package's rooms: cli -> serving -> engine -> adapters ->
prompt_tuning -> speculation -> parallel -> sampling -> models -> quantization -> layers -> weights -> config,
then textgen_kernels (docs/ARCHITECTURE.md). An import under `if TYPE_CHECKING:` (annotations only) is exempt."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[2] / "src"
ROOMS = ["cli", "serving", "engine", "adapters", "prompt_tuning", "speculation", "parallel",
         "sampling", "models", "quantization", "layers", "weights", "config"]


def _room(dotted: str) -> str | None:
    """The room of a module path under textgen_backend (its root modules count as "config")."""
    parts = dotted.split(".")
    if parts[0] != "textgen_backend" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in ROOMS else "config"


def _runtime_imports(tree: ast.Module):
    """Imported module paths, skipping `if TYPE_CHECKING:` blocks."""
    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            if node.module == "textgen_backend":  # from textgen_backend import serving
                yield from (f"textgen_backend.{alias.name}" for alias in node.names)
            else:
                yield node.module
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
    yield from visit(tree)


def _upward_imports(src: Path, package: str) -> list[str]:
    found = []
    for path in sorted((src / package).rglob("*.py")):
        relative = path.relative_to(src).with_suffix("")
        source = _room(".".join(relative.parts)) or "config"
        for module in _runtime_imports(ast.parse(path.read_text())):
            target = _room(module)
            if package == "textgen_kernels" and module.startswith("textgen_backend"):
                found.append(f"{relative}: {module} (kernels import nothing of the backend)")
            elif target and ROOMS.index(target) < ROOMS.index(source):
                found.append(f"{relative} ({source}) imports {module} ({target})")
    return found


def test_imports_only_go_down_the_rooms():
    assert _upward_imports(SRC, "textgen_backend") == []
    assert _upward_imports(SRC, "textgen_kernels") == []


def test_an_upward_import_is_found(tmp_path):
    room = tmp_path / "textgen_backend" / "engine"
    room.mkdir(parents=True)
    (room / "bad.py").write_text("from textgen_backend.serving.service import X\n"
                                 "if TYPE_CHECKING:\n    from textgen_backend.cli import logs\n")
    assert _upward_imports(tmp_path, "textgen_backend") == [
        "textgen_backend/engine/bad (engine) imports textgen_backend.serving.service (serving)"]
