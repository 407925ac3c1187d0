"""The request reference names every public tensor of the contract (no row goes missing)."""
from pathlib import Path

import pytest

from textgen_backend.serving import contract

pytestmark = pytest.mark.unit
REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "request-reference.md"


def test_reference_table_has_a_row_for_every_public_tensor():
    text = REFERENCE.read_text()
    public = (contract.ENSEMBLE_INPUTS + contract.ENSEMBLE_OUTPUTS + contract.TOKENIZER_INPUTS
              + contract.TOKENIZE_API_OUTPUTS)
    missing = [spec.name for spec in public if f"| `{spec.name}`" not in text
               and f"`{spec.name}` (alias" not in text and f"(alias `{spec.name}`)" not in text]
    assert missing == []


def test_architecture_map_names_every_module_of_the_tree():
    architecture = (REFERENCE.parent / "ARCHITECTURE.md").read_text()
    package = REFERENCE.parents[1] / "src" / "textgen_backend"
    rooms = {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    missing = [f"{room}/" for room in rooms if f"textgen_backend/{room}/" not in architecture]
    missing += [str(p.relative_to(package)) for p in package.rglob("*.py")
                if p.name != "__init__.py" and f"`{p.name}`" not in architecture]
    assert missing == []
