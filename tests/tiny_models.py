"""Tiny random-weight models with a real byte-level BPE tokenizer, saved in Hugging Face layout.

Weights are drawn large enough (initializer_range 0.2) that greedy decoding has clear winners,
so float32 parity with transformers is token-exact; the EOS row of lm_head is zeroed so
random models don't stop at once (EOS logit 0 loses to the max of ~400 random logits).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = """The quick brown fox jumps over the lazy dog. Café, naïve, façade, jalapeño!
Hello world: 12345 + 678 = 13023. Emoji 😀 and 🚀; CJK 日本語 テキスト 中文 한국어.
Streams of tokens become text, one delta at a time. Paris is the capital of France.
""" * 4

BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def build_tokenizer(out_dir: Path, vocab_size: int = 400) -> int:
    """Trains a byte-level BPE on CORPUS, saves tokenizer files; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS], trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512}))
    return tokenizer.get_vocab_size()


def build_tiny_model(out_dir: Path, architecture: str = "llama", seed: int = 0,
                     max_position_embeddings: int = 512, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     initializer_range: float = 0.2, sliding_window: int = 16) -> Path:
    import transformers

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir)
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[architecture])
    config = config_cls(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1, pad_token_id=None)
    if architecture == "mistral":
        config.sliding_window = sliding_window
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.lm_head.weight[config.eos_token_id].zero_()
    model.save_pretrained(out_dir)
    return out_dir
