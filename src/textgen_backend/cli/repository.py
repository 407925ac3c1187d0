"""Renders a deployable Triton model repository from the templates in model_repository/.

Templates use `${name}` placeholders; rendering fails on a placeholder with no value and on
any `${` left over. Tensor lists and ensemble maps come from contract.py, so the configs
cannot drift from what the model.py files and the client use.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from textgen_backend.serving import contract
from textgen_backend.config import EngineConfig

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "model_repository"  # package data
MODELS = ("ensemble", "tokenizer", "generator", "detokenizer")
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class TemplateError(ValueError):
    pass


def render_template(text: str, values: dict[str, str], source: str = "template") -> str:
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise TemplateError(f"{source}: unknown template keys {unknown}")
    rendered = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    if "${" in rendered:
        raise TemplateError(f"{source}: a placeholder is left after rendering")
    return rendered


def _tensors(specs) -> str:
    return ",\n".join("  " + spec.pbtxt() for spec in specs)


def _maps(inputs: dict[str, str], outputs: dict[str, str]) -> str:
    """input_map/output_map blocks: {model tensor: ensemble tensor}."""
    lines = [f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    lines += [f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return "\n".join(lines)


def _identity(specs) -> dict[str, str]:
    return {s.name: s.name for s in specs}


def template_values(config: EngineConfig) -> dict[str, dict[str, str]]:
    """Placeholder values for each model's config.pbtxt."""
    common = {"max_batch_size": str(config.max_client_batch_size)}
    engine_json = config.to_json().replace("\\", "\\\\").replace('"', '\\"')
    return {
        "ensemble": {
            **common,
            "inputs": _tensors(contract.ENSEMBLE_INPUTS),
            "outputs": _tensors(contract.ENSEMBLE_OUTPUTS),
            "tokenizer_maps": _maps(_identity(contract.TOKENIZER_ENSEMBLE_INPUTS),
                                    _identity(contract.TOKENIZER_OUTPUTS)),
            "generator_maps": _maps(
                _identity(contract.TOKENIZER_OUTPUTS + contract.GENERATION_PARAMETERS),
                _identity(contract.GENERATOR_OUTPUTS)),
            "detokenizer_maps": _maps(_identity(contract.DETOKENIZER_INPUTS),
                                      _identity(contract.DETOKENIZER_OUTPUTS)),
        },
        "tokenizer": {**common, "inputs": _tensors(contract.TOKENIZER_INPUTS),
                      "outputs": _tensors(contract.TOKENIZER_OUTPUTS
                                          + contract.TOKENIZE_API_OUTPUTS),
                      "tokenizer_instances": str(config.validation_workers),
                      "engine_config": engine_json},
        "generator": {**common, "inputs": _tensors(contract.GENERATOR_INPUTS),
                      "outputs": _tensors(contract.GENERATOR_OUTPUTS),
                      "engine_config": engine_json},
        "detokenizer": {**common, "inputs": _tensors(contract.DETOKENIZER_INPUTS),
                        "outputs": _tensors(contract.DETOKENIZER_OUTPUTS)},
    }


def render_repository(config: EngineConfig, output: Path,
                      template_dir: Path = TEMPLATE_DIR) -> Path:
    """Writes output/<model>/{config.pbtxt, 1/model.py}; replaces what a previous render left."""
    if not config.model_id:
        raise ValueError("model_id is required")
    values = template_values(config)
    output = Path(output)
    for model in MODELS:
        source = template_dir / model / "config.pbtxt"
        rendered = render_template(source.read_text(), values[model], str(source))
        target = output / model
        if target.exists():
            shutil.rmtree(target)
        (target / "1").mkdir(parents=True)
        (target / "config.pbtxt").write_text(rendered)
        model_py = template_dir / model / "1" / "model.py"
        if model_py.exists():
            shutil.copyfile(model_py, target / "1" / "model.py")
    return output
