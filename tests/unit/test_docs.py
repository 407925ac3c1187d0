"""The request reference names every public tensor of the contract (no row goes missing)."""
from pathlib import Path

import pytest

from textgen_backend import contract

pytestmark = pytest.mark.unit
REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "request-reference.md"


def test_reference_table_has_a_row_for_every_public_tensor():
    text = REFERENCE.read_text()
    public = (contract.ENSEMBLE_INPUTS + contract.ENSEMBLE_OUTPUTS + contract.TOKENIZER_INPUTS
              + contract.TOKENIZE_API_OUTPUTS)
    missing = [spec.name for spec in public if f"| `{spec.name}`" not in text
               and f"`{spec.name}` (alias" not in text and f"(alias `{spec.name}`)" not in text]
    assert missing == []
