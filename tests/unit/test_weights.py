import json

import pytest
import torch
from safetensors.torch import save_file

from textgen_backend.weights.loading import iterate_weights, resolve_model_dir

pytestmark = pytest.mark.unit


def test_sharded_index_and_single_file(tmp_path):
    a, b = torch.randn(2, 3), torch.randn(4)
    save_file({"a": a}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": b}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}))
    loaded = dict(iterate_weights(tmp_path))
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"c": a}, single / "model.safetensors")
    assert list(dict(iterate_weights(single))) == ["c"]
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        list(iterate_weights(tmp_path / "single" / ".."/ "single" / "missing"))


def test_hub_id_resolves_offline_from_the_hub_cache(tmp_path):
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_model_dir("acme/tiny", hub_cache=str(tmp_path)) == snapshot
    with pytest.raises(FileNotFoundError, match="never downloaded at run time"):
        resolve_model_dir("acme/absent", hub_cache=str(tmp_path))
