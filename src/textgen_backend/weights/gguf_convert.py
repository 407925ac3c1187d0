"""Convert a llama-architecture GGUF file into a float32 Hugging Face model directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)."""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".textgen-converted"

_REQUIRED = object()

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# (Hugging Face role, llama.cpp "tokenizer.ggml.<key>_token_id")
_SPECIAL_TOKEN_KEYS = (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))


def _byte_level(digits: bool) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


# llama.cpp pre-type -> does it split every digit (its "\p{N}" regex) before the GPT-2 regex.
# llama.cpp's own "default" is not GPT-2 (it adds punctuation and 3-digit rules), so it is rejected.
_PRE_TYPE_SPLITS_DIGITS = {
    "smollm": True, "starcoder": True, "refact": True, "codeshell": True,
    "gpt2": False, "mpt": False, "olmo": False,
}


def _field(reader: GGUFReader, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def _float32_value(value: float) -> float:
    # GGUF stores these as float32; the shortest float32 repr keeps 1e-05 from becoming 9.99999974e-06
    return float(str(np.float32(value)))


def _llama_config(reader: GGUFReader, vocab_size: int, tied: bool) -> dict:
    def meta(name, default=_REQUIRED):
        return _field(reader, f"llama.{name}", default)

    hidden_size = meta("embedding_length")
    num_heads = meta("attention.head_count")
    head_dim = meta("attention.key_length", hidden_size // num_heads)
    if meta("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary (rope.dimension_count != head_dim) is not supported")
    rope_scaling = meta("rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"rope scaling {rope_scaling!r} is not supported")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for role, key in _SPECIAL_TOKEN_KEYS:
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None and role != "unk":
            config[f"{role}_token_id"] = token_id
    return config


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")  # blk.<layer>.<kind>.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation, which interleaves each head's two rotary halves."""
    # llama.cpp: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2); this is its inverse
    halves = weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def _hf_weights(reader: GGUFReader, config: dict) -> dict[str, np.ndarray]:
    weights = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest-first (ggml "ne" order); numpy wants them reversed
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)
        if tensor.name.endswith(".attn_q.weight"):
            weight = _unpermute_rotary(weight, config["num_attention_heads"])
        elif tensor.name.endswith(".attn_k.weight"):
            weight = _unpermute_rotary(weight, config["num_key_value_heads"])
        weights[_hf_tensor_name(tensor.name)] = np.ascontiguousarray(weight)
    return weights


def _auto_added_ids(reader: GGUFReader, role: str) -> list[int]:
    """[id] of the bos/eos token when llama.cpp adds it to every sequence (add_<role>_token), else []."""
    if not _field(reader, f"tokenizer.ggml.add_{role}_token", False):
        return []
    return [_field(reader, f"tokenizer.ggml.{role}_token_id")]


def _tokenizer(reader: GGUFReader, tokens: list[str]) -> Tokenizer:
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model_kind!r} is not supported (only byte-level BPE 'gpt2')")
    pre_type = _field(reader, "tokenizer.ggml.pre", "default")
    if pre_type not in _PRE_TYPE_SPLITS_DIGITS:
        raise ValueError(f"GGUF tokenizer pre-type {pre_type!r} is not supported "
                         f"(known: {', '.join(sorted(_PRE_TYPE_SPLITS_DIGITS))})")
    # merges are "left right"; byte-level symbols never contain a plain space
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = _byte_level(digits=_PRE_TYPE_SPLITS_DIGITS[pre_type])
    tokenizer.decoder = decoders.ByteLevel()

    token_types = _field(reader, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(token_types) if kind == TokenType.CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(token_types) if kind == TokenType.USER_DEFINED])

    bos_ids, eos_ids = _auto_added_ids(reader, "bos"), _auto_added_ids(reader, "eos")
    bos, eos = [tokens[i] for i in bos_ids], [tokens[i] for i in eos_ids]
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B"] + eos,
            special_tokens=[(tokens[i], i) for i in dict.fromkeys(bos_ids + eos_ids)]),
    ])
    return tokenizer


def _tokenizer_config(reader: GGUFReader, tokens: list[str]) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _field(reader, "llama.context_length"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for role, key in _SPECIAL_TOKEN_KEYS:
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            config[f"{role}_token"] = tokens[token_id]
    chat_template = _field(reader, "tokenizer.chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama GGUF file into a float32 HF model directory at out_dir; returns out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    architecture = _field(reader, "general.architecture")
    if architecture != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {architecture!r} is not supported (only 'llama')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"{gguf_path}: the token list has duplicates, so no token -> id vocabulary exists")
    tokenizer = _tokenizer(reader, tokens)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # the embedding may have more rows than tokens
    config = _llama_config(reader, vocab_size, tied="output.weight" not in tensors)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / "model.safetensors"
    save_file(_hf_weights(reader, config), str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors creates it 0600, unlike the JSON files beside it
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(reader, tokens))
    _write_json(out_dir / "config.json", config)
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    _write_json(out_dir / "generation_config.json", generation)
    logger.info("[textgen] converted %s -> %s", gguf_path, out_dir)
    return out_dir


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf_cached(gguf_path: str | os.PathLike, cache_root: str | os.PathLike) -> Path:
    """Convert into cache_root/<first 16 hex of the file's sha256>/, reusing a completed earlier conversion."""
    gguf_path, cache_root = Path(gguf_path), Path(cache_root)
    sha256 = _sha256(gguf_path)
    model_dir = cache_root / sha256[:16]
    if (model_dir / COMPLETE_MARKER).exists():
        logger.info("[textgen] reusing converted %s at %s", gguf_path.name, model_dir)
        return model_dir

    cache_root.mkdir(parents=True, exist_ok=True)
    # convert beside the target and rename it there: a killed run leaves a .tmp directory, never a
    # model_dir without the marker
    staging = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", suffix=".tmp", dir=cache_root))
    try:
        convert_gguf(gguf_path, staging)
        logger.info("[textgen] caching the conversion of %s as %s", gguf_path.name, model_dir)
        _write_json(staging / COMPLETE_MARKER, {"source": str(gguf_path), "sha256": sha256})
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users
        if model_dir.exists() and not (model_dir / COMPLETE_MARKER).exists():  # a leftover we never completed
            shutil.rmtree(model_dir)
        try:
            os.rename(staging, model_dir)
        except OSError:
            if not (model_dir / COMPLETE_MARKER).exists():
                raise
            logger.info("[textgen] %s was converted concurrently; keeping that copy", model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir
