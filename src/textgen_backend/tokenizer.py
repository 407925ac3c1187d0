"""Loading the model's tokenizer and turning prompts (plain or chat) into token ids."""
from __future__ import annotations

import json
from pathlib import Path

from textgen_backend.params import RequestError


def load_tokenizer(model_dir: Path, tokenizer_config_path: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer_config_path:
        template = json.loads(Path(tokenizer_config_path).read_text()).get("chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def encode_prompt(tokenizer, text: str, apply_chat_template: bool) -> tuple[list[int], str]:
    """(token ids, the text they encode). A chat prompt is a JSON list of {role, content}."""
    if not apply_chat_template:
        return tokenizer(text)["input_ids"], text
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"with apply_chat_template, text_input must be a JSON list of "
                           f"messages: {exc}") from None
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise RequestError('with apply_chat_template, text_input must be a non-empty JSON list '
                           'of {"role": str, "content": str} messages')
    if not tokenizer.chat_template:
        raise RequestError("apply_chat_template was requested but the model has no chat template")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds the special tokens (BOS and the like).
    return tokenizer(rendered, add_special_tokens=False)["input_ids"], rendered


def tokenize_batch(tokenizer, raw_texts, chat_flags) -> dict:
    """The tokenizer model's work for one request: rows of UTF-8 text -> padded ids.

    Returns the generator's inputs: _input_ids [B, max_len] (padded with 0), _input_lengths
    [B, 1], _prompt_text [B, 1].
    """
    import numpy as np

    ids, texts = [], []
    for row, raw in enumerate(raw_texts):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise RequestError(f"text_input row {row} is not valid UTF-8: {exc}") from None
        if not text:
            raise RequestError(f"text_input row {row} is empty")
        row_ids, prompt_text = encode_prompt(tokenizer, text, bool(chat_flags[row]))
        ids.append(row_ids)
        texts.append(prompt_text.encode())
    width = max(1, max(len(x) for x in ids))
    padded = np.zeros((len(ids), width), dtype=np.int32)
    for row, row_ids in enumerate(ids):
        padded[row, :len(row_ids)] = row_ids
    return {
        "_input_ids": padded,
        "_input_lengths": np.array([[len(x)] for x in ids], dtype=np.int32),
        "_prompt_text": np.array([[t] for t in texts], dtype=np.object_),
    }
