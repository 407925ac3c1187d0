"""GGUF -> HF round trip: a tiny random Llama written the way llama.cpp writes it, converted back."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType, quants
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from textgen_backend.weights import gguf_convert
from textgen_backend.cli.textgen import main as cli_main
from textgen_backend.weights.gguf_convert import COMPLETE_MARKER, convert_gguf, convert_gguf_cached

pytestmark = pytest.mark.unit

TEXT = "Hi 日本語 😀! 12345"
# the last one is a control token that is not bos/eos/unk/pad, which transformers would register anyway
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]
BOS_ID, EOS_ID, REPO_NAME_ID = 1, 2, 3
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["Hi there! The year 12345 came after 2024 and 1999.", "日本語 is Japanese; 日本 is Japan.",
          "Hello world, 123 456 789 12345 00 11 22.", "The capital of France is Paris 😀."] * 20
ROPE_THETA = 50000.0  # not transformers' default, so a lost rope_theta changes the logits

# HF name -> GGUF name, written out independently of the converter's own table
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
# the rest is F32; F16 and the quantized types each appear at least once, as in real files
GGUF_TYPES = {"token_embd.weight": GGMLQuantizationType.Q8_0, "blk.0.ffn_down.weight": GGMLQuantizationType.Q4_1,
              "blk.0.attn_v.weight": GGMLQuantizationType.F16, "blk.1.attn_v.weight": GGMLQuantizationType.F16}


@dataclass
class TinyGGUF:
    path: Path
    model: LlamaForCausalLM
    stored_weights: dict[str, np.ndarray]  # HF name -> the values the GGUF file holds (after quantization)


def _gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<n>.<module>.weight
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # what llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def source_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    # trained without the digit split, so digit merges exist and a converter that drops Digits is caught
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _random_llama(vocab_size: int, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=ROPE_THETA,
                         max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # random norms too: swapped norm tensors must not hide behind all-ones
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def _write_gguf(path: Path, tokenizer: Tokenizer, *, tied=False, add_bos=False, pre="smollm",
                architecture="llama") -> TinyGGUF:
    model = _random_llama(tokenizer.get_vocab_size(), tied)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)

    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if token in SPECIAL_TOKENS else TokenType.NORMAL for token in tokens])
    writer.add_token_merges([" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    stored = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name, weight = _gguf_name(hf_name), tensor.numpy()
        gguf_type = GGUF_TYPES.get(name, GGMLQuantizationType.F32)
        if gguf_type == GGMLQuantizationType.F16:
            weight = weight.astype(np.float16).astype(np.float32)  # the values F16 can hold
        elif gguf_type != GGMLQuantizationType.F32:
            weight = quants.dequantize(quants.quantize(weight, gguf_type), gguf_type)
        stored[hf_name] = weight
        if name.endswith("attn_q.weight"):
            weight = _llama_cpp_permute(weight, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        if gguf_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(name, weight.astype(np.float16 if gguf_type == GGMLQuantizationType.F16 else np.float32))
        else:
            writer.add_tensor(name, quants.quantize(weight, gguf_type), raw_dtype=gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, model, stored)


@pytest.fixture(scope="module")
def untied(tmp_path_factory, source_tokenizer) -> tuple[TinyGGUF, Path]:
    root = tmp_path_factory.mktemp("untied")
    tiny = _write_gguf(root / "tiny.gguf", source_tokenizer)
    return tiny, convert_gguf(tiny.path, root / "hf")


def _reference_logits(tiny: TinyGGUF, input_ids: torch.Tensor) -> torch.Tensor:
    # the original model carrying the values the GGUF file holds (quantized ones included)
    reference = LlamaForCausalLM(tiny.model.config).eval()
    reference.load_state_dict({name: torch.from_numpy(w) for name, w in tiny.stored_weights.items()}, strict=False)
    if tiny.model.config.tie_word_embeddings:
        reference.tie_weights()
    with torch.no_grad():
        return reference(input_ids).logits


def _converted_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    converted = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return converted(input_ids).logits


def test_every_weight_round_trips(untied):
    tiny, model_dir = untied
    converted = load_file(model_dir / "model.safetensors")
    original = {name: t.numpy() for name, t in tiny.model.state_dict().items()}
    assert sorted(converted) == sorted(original)
    for name, weight in converted.items():
        assert weight.dtype == np.float32, name
        np.testing.assert_array_equal(weight, tiny.stored_weights[name], err_msg=name)
    # quantized tensors: identical to the file's values, and within the quantization step of the originals
    embed = "model.embed_tokens.weight"
    assert np.abs(converted[embed] - original[embed]).max() <= np.abs(original[embed]).max() / 127
    down = "model.layers.0.mlp.down_proj.weight"
    assert np.abs(converted[down] - original[down]).max() <= np.ptp(original[down]) / 15


def test_config_from_metadata(untied):
    tiny, model_dir = untied
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 128, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rope_theta"] == ROPE_THETA
    assert config["rms_norm_eps"] == 1e-5  # not float32's 9.99999974e-06
    assert config["max_position_embeddings"] == 256
    assert config["vocab_size"] == tiny.model.config.vocab_size
    assert config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (BOS_ID, EOS_ID, "float32")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS_ID, EOS_ID)


def test_logits_match_original(untied):
    tiny, model_dir = untied
    input_ids = torch.randint(0, tiny.model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_converted_logits(model_dir, input_ids), _reference_logits(tiny, input_ids),
                               rtol=0, atol=1e-5)


def test_tokenizer_matches_source(untied, source_tokenizer):
    _, model_dir = untied
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEXT).input_ids
    assert ids == source_tokenizer.encode(TEXT).ids
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.tokenize("12345") == list("12345")
    without_digit_split = Tokenizer.from_str(source_tokenizer.to_str())
    without_digit_split.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert len(without_digit_split.encode("12345").ids) < 5  # so the digit check above can fail

    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", BOS_ID)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", EOS_ID)
    assert tokenizer("<repo_name>Hi").input_ids == [REPO_NAME_ID, *source_tokenizer.encode("Hi").ids]
    assert tokenizer.decode(tokenizer("<repo_name>Hi<|im_end|>").input_ids, skip_special_tokens=True) == "Hi"
    # the tokenizer.json alone (as a server's detokenizer loads it) behaves the same
    assert Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(TEXT).ids == ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tied_embeddings_and_add_bos(tmp_path, source_tokenizer):
    tiny = _write_gguf(tmp_path / "tied.gguf", source_tokenizer, tied=True, add_bos=True)
    model_dir = convert_gguf(tiny.path, tmp_path / "hf")
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    input_ids = torch.randint(0, tiny.model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_converted_logits(model_dir, input_ids), _reference_logits(tiny, input_ids),
                               rtol=0, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer(TEXT).input_ids == [BOS_ID, *source_tokenizer.encode(TEXT).ids]


def test_rejects_unknown_pre_type(tmp_path, source_tokenizer):
    tiny = _write_gguf(tmp_path / "qwen.gguf", source_tokenizer, pre="qwen2")
    with pytest.raises(ValueError, match="pre-type 'qwen2' is not supported"):
        convert_gguf(tiny.path, tmp_path / "hf")


def test_rejects_other_architecture(tmp_path, source_tokenizer):
    tiny = _write_gguf(tmp_path / "falcon.gguf", source_tokenizer, architecture="falcon")
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        convert_gguf(tiny.path, tmp_path / "hf")


def test_cached_conversion_is_reused(tmp_path, untied, monkeypatch):
    tiny, _ = untied
    model_dir = convert_gguf_cached(tiny.path, tmp_path)
    assert model_dir == tmp_path / hashlib.sha256(tiny.path.read_bytes()).hexdigest()[:16]
    assert (model_dir / COMPLETE_MARKER).exists() and (model_dir / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]  # no staging leftovers

    def must_not_convert(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf_convert, "convert_gguf", must_not_convert)
    assert convert_gguf_cached(tiny.path, tmp_path) == model_dir


def test_interrupted_conversion_leaves_nothing(tmp_path, untied, monkeypatch):
    tiny, _ = untied

    def interrupted(gguf_path, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf_convert, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_cached(tiny.path, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_gguf(tmp_path, untied):
    tiny, model_dir = untied
    assert cli_main(["convert-gguf", str(tiny.path), str(tmp_path / "out")]) == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (model_dir / name).read_bytes(), name
