"""convert-to-safetensors and download-weights (offline: the hub is a local directory), and
pickled .bin weights refused at serve time unless --load-format pt."""
import json
import shutil

import huggingface_hub
import pytest
import torch

from textgen_backend.cli import textgen as cli
from textgen_backend.config import EngineConfig
from textgen_backend.weights.convert_weights import unshared
from textgen_backend.weights.download import download_weights
from textgen_backend.engine.engine import Engine
from textgen_backend.weights.loading import iterate_weights
from tiny_models import build_tiny_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bin_model(tmp_path_factory):
    """The tiny Llama as PyTorch .bin weights only, in two shards with an index (torch.save),
    and its original safetensors state for comparison."""
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama")
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    bin_dir = tmp_path_factory.mktemp("bin") / "model"
    shutil.copytree(model_dir, bin_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        torch.save({n: state[n] for n in shard_names}, bin_dir / shard)
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: shard for shard, ns in shards.items() for n in ns}}))
    return bin_dir, state


def test_bin_weights_are_refused_unless_allowed(bin_model, tmp_path):
    bin_dir, state = bin_model
    with pytest.raises(FileNotFoundError, match="textgen convert-to-safetensors"):
        next(iterate_weights(bin_dir))
    loaded = dict(iterate_weights(bin_dir, "pt"))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    with pytest.raises(FileNotFoundError, match="textgen convert-to-safetensors"):
        Engine(EngineConfig(model_id=str(bin_dir), dtype="float32"), bin_dir)
    Engine(EngineConfig(model_id=str(bin_dir), dtype="float32", load_format="pt"), bin_dir)


def test_convert_to_safetensors_command(bin_model, tmp_path, capsys):
    bin_dir, state = bin_model
    work = tmp_path / "model"
    shutil.copytree(bin_dir, work)
    assert cli.main(["convert-to-safetensors", str(work)]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    loaded = dict(iterate_weights(work))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    # Served from the converted files, the model equals the one loaded from the .bin files.
    ours = Engine(EngineConfig(model_id=str(work), dtype="float32"), work)
    theirs = Engine(EngineConfig(model_id=str(bin_dir), dtype="float32", load_format="pt"),
                    bin_dir)
    # --weights-cache-override: the weights from elsewhere, config and tokenizer from model_id.
    elsewhere = Engine(EngineConfig(model_id=str(bin_dir), dtype="float32",
                                    weights_cache_override=str(work)), bin_dir)
    for engine in (theirs, elsewhere):
        for (name, a), (_, b) in zip(ours.runner.model.state_dict().items(),
                                     engine.runner.model.state_dict().items()):
            assert torch.equal(a, b), name


def test_tied_and_shared_tensors_are_saved_once():
    embed = torch.randn(4, 3)
    fused = torch.randn(6, 3)
    state = {"model.embed_tokens.weight": embed, "lm_head.weight": embed,
             "q": fused[:3], "k": fused[3:]}
    result = unshared(state)
    assert sorted(result) == ["k", "model.embed_tokens.weight", "q"]
    assert torch.equal(result["q"], fused[:3]) and torch.equal(result["k"], fused[3:])
    assert result["q"].untyped_storage().data_ptr() != result["k"].untyped_storage().data_ptr()


class LocalHub:
    """huggingface_hub's list_repo_files and snapshot_download over a local directory."""

    def __init__(self, remote, cache):
        self.remote, self.cache, self.downloaded = remote, cache, []

    def list_repo_files(self, model_id, revision=None):
        return sorted(p.name for p in self.remote.iterdir()) + ["onnx/model.safetensors"]

    def snapshot_download(self, model_id, revision=None, cache_dir=None, allow_patterns=None):
        snapshot = self.cache / "snapshots" / "abc123"
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            shutil.copy(self.remote / name, snapshot / name)
            self.downloaded.append(name)
        return str(snapshot)


def install_hub(monkeypatch, hub):
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, model_id, revision=None: hub.list_repo_files(model_id,
                                                                                  revision))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)


def test_download_weights_prefers_safetensors(monkeypatch, tmp_path):
    remote = build_tiny_model(tmp_path / "remote", "llama")
    torch.save({"x": torch.zeros(1)}, remote / "pytorch_model.bin")   # also published
    hub = LocalHub(remote, tmp_path / "cache")
    install_hub(monkeypatch, hub)
    snapshot = download_weights("acme/tiny")
    assert "pytorch_model.bin" not in hub.downloaded
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        hub.downloaded)
    assert next(iterate_weights(snapshot))[0]


def test_download_weights_falls_back_to_bin_and_converts(monkeypatch, bin_model, tmp_path,
                                                         capsys):
    bin_dir, state = bin_model
    hub = LocalHub(bin_dir, tmp_path / "cache")
    hub.list_repo_files = lambda model_id, revision=None: sorted(p.name for p in bin_dir.iterdir())
    install_hub(monkeypatch, hub)
    assert cli.main(["download-weights", "acme/tiny-bin"]) == 0
    snapshot = capsys.readouterr().out.strip()
    assert "pytorch_model.bin.index.json" in hub.downloaded
    loaded = dict(iterate_weights(type(bin_dir)(snapshot)))
    assert all(torch.equal(loaded[n], state[n]) for n in state)
    with pytest.raises(FileNotFoundError, match="no files with extensions .gguf"):
        download_weights("acme/tiny-bin", extensions=(".gguf",))
