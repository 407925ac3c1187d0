import re
import subprocess
import sys
from pathlib import Path

import pytest

from textgen_backend.serving import contract
from textgen_backend.config import EngineConfig
from textgen_backend.cli.repository import MODELS, TemplateError, render_repository, render_template

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_render_template_fails_on_unknown_key_and_leftover():
    assert render_template("a ${x} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(TemplateError, match="unknown template keys \\['y'\\]"):
        render_template("${x} ${y}", {"x": "1"})
    with pytest.raises(TemplateError, match="left"):
        render_template("${x}", {"x": "${"})


def test_rendered_repository_has_every_model_and_contract_tensor(tmp_path):
    config = EngineConfig(model_id="/models/m", max_client_batch_size=8, max_stop_sequences=2)
    render_repository(config, tmp_path)
    for model in MODELS:
        text = (tmp_path / model / "config.pbtxt").read_text()
        assert "${" not in text and f'name: "{model}"' in text
        assert "max_batch_size: 8" in text
        assert (tmp_path / model / "1").is_dir()
    ensemble = (tmp_path / "ensemble" / "config.pbtxt").read_text()
    for spec in contract.ENSEMBLE_INPUTS + contract.ENSEMBLE_OUTPUTS:
        assert f'name: "{spec.name}"' in ensemble
    generator = (tmp_path / "generator" / "config.pbtxt").read_text()
    assert "decoupled: true" in generator
    config_json = re.search(r'string_value: "(.*)"', generator).group(1).replace('\\"', '"')
    assert EngineConfig.from_json(config_json) == config
    assert (tmp_path / "generator" / "1" / "model.py").read_text().startswith('"""Triton glue')


def test_render_rejects_a_template_with_an_unknown_key(tmp_path):
    templates = tmp_path / "templates"
    for model in MODELS:
        (templates / model / "1").mkdir(parents=True)
        (templates / model / "config.pbtxt").write_text("max_batch_size: ${max_batch_size}")
    (templates / "generator" / "config.pbtxt").write_text("${no_such_key}")
    with pytest.raises(TemplateError, match="no_such_key"):
        render_repository(EngineConfig(model_id="m"), tmp_path / "out", template_dir=templates)


def test_build_py_cli(tmp_path):
    out = tmp_path / "repo"
    result = subprocess.run([sys.executable, str(ROOT / "build.py"), "--model-id", "/m",
                             "--output", str(out), "--max-total-tokens", "1024",
                             "--max-input-tokens", "1000"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '\\"max_total_tokens\\": 1024' in (out / "generator" / "config.pbtxt").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "build.py"), "--model-id", "/m",
                          "--output", str(out), "--max-input-tokens", "2000",
                          "--max-total-tokens", "1000"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "max_input_tokens (2000) must be < max_total_tokens (1000)" in bad.stderr
