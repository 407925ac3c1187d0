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


def test_the_gil_free_reader_reads_what_safetensors_reads(tmp_path):
    """Mixed dtypes, odd sizes, empty and 0-d tensors; a tensor off its dtype's alignment
    (written by hand); a file cut short and a header past the file are refused."""
    from safetensors.torch import load_file, save_file

    from textgen_backend.weights.safetensors_read import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16),
               "b": torch.randn(7, generator=g),
               "c": torch.randint(-5, 5, (3,), generator=g).to(torch.int8),
               "d": torch.randn(2, 3, generator=g).double(),
               "e": torch.zeros(0, 4), "f": torch.tensor(2.5, dtype=torch.float16),
               "g": torch.randn(4, generator=g).to(torch.float8_e4m3fn)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    ours, theirs = read_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8)), name
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="does not fit"):
        read_safetensors(path)
    # the library aligns what it writes; another writer may not: float32 at byte 2
    header = json.dumps({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                         "b": {"dtype": "F32", "shape": [3], "data_offsets": [2, 14]}}).encode()
    floats = torch.tensor([1.5, -2.0, 3.25])
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes([7, 9])
                     + floats.numpy().tobytes())
    unaligned = read_safetensors(path)
    assert unaligned["a"].tolist() == [7, 9] and torch.equal(unaligned["b"], floats)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="is no safetensors file"):
        read_safetensors(path)
