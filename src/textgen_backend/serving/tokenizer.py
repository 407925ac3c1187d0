"""Loading the model's tokenizer and turning prompts (plain or chat) into token ids."""
from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np

from textgen_backend.serving import contract
from textgen_backend.sampling.params import RequestError

# Every tensor a client may send, to the ensemble or to the tokenizer (Tokenize API).
_INPUT_NAMES = sorted({s.name for s in contract.ENSEMBLE_INPUTS + contract.TOKENIZER_INPUTS})


def load_tokenizer(model_dir: Path, tokenizer_config_path: str | None = None,
                   trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tokenizer_config_path:
        template = json.loads(Path(tokenizer_config_path).read_text()).get("chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def encode_prompt(tokenizer, text: str, apply_chat_template: bool,
                  with_offsets: bool = False) -> tuple[list[int], str, list | None]:
    """(token ids, the text they encode, [start, end) character offsets when asked).
    A chat prompt is a JSON list of {role, content} messages, rendered with the chat template."""
    add_special_tokens = True
    if apply_chat_template:
        text = _render_chat(tokenizer, text)
        add_special_tokens = False  # the template already holds BOS and the like
    encoded = tokenizer(text, add_special_tokens=add_special_tokens,
                        return_offsets_mapping=with_offsets)
    return encoded["input_ids"], text, encoded.get("offset_mapping")


def _render_chat(tokenizer, text: str) -> str:
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
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_parameters(parameters_json: str) -> None:
    """Refuses request parameters (`request.parameters()`, a JSON object). Ours are all input
    tensors; Triton's HTTP `generate` turns every JSON key that names no input into a
    parameter, so a key here is misspelled or unsupported, and ignoring it would serve the
    request with defaults. Triton consumes its reserved keys over gRPC and HTTP `infer`
    (sequence_id, priority, timeout, triton_*); `generate` passes its request "id" on too."""
    unknown = sorted(set(json.loads(parameters_json or "{}")) - {"id"})
    if unknown:
        named = ", ".join(f"{name!r}{_did_you_mean(name)}" for name in unknown)
        raise RequestError(f"unknown parameter{'s' * (len(unknown) > 1)} {named}: the "
                           f"parameters are the inputs listed in docs/request-reference.md")


def _did_you_mean(name: str) -> str:
    if name in _INPUT_NAMES:
        return " (an input tensor: send it as an input)"
    close = difflib.get_close_matches(name, _INPUT_NAMES, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def tokenize_request(tokenizer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tokenizer model's work for one request (also TGIS's Tokenize API).

    inputs: text_input [B, 1] and optional apply_chat_template, truncate_input_tokens
    (keep the last N tokens; 0 keeps all), return_tokens, return_offsets ([B, 1]: Triton
    refuses other row counts before the model runs).
    Returns the generator's inputs (_input_ids [B, L] padded with 0, _input_lengths,
    _prompt_text: the text of the kept tokens) and the API's outputs (token_count, input_ids,
    tokens padded with "", offsets [B, L, 2] padded with -1; tokens and offsets are empty
    unless asked for).
    """
    if "text_input" not in inputs:
        raise RequestError("text_input is required (the prompt, STRING [B, 1])")
    texts = inputs["text_input"].reshape(-1)
    batch = len(texts)

    def option(name, default):
        if name not in inputs:
            return [default] * batch
        values = inputs[name].reshape(-1)
        if len(values) not in (1, batch):
            raise RequestError(f"{name} has {len(values)} rows but text_input has {batch}")
        return [values[0 if len(values) == 1 else row].item() for row in range(batch)]

    chat, truncate = option("apply_chat_template", False), option("truncate_input_tokens", 0)
    want_tokens, want_offsets = any(option("return_tokens", False)), any(
        option("return_offsets", False))
    rows = []
    for row, raw in enumerate(texts):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise RequestError(f"text_input row {row} is not valid UTF-8: {exc}") from None
        if not text:
            raise RequestError(f"text_input row {row} is empty")
        if truncate[row] < 0:
            raise RequestError(f"truncate_input_tokens must be >= 0, got {truncate[row]}")
        ids, text, offsets = encode_prompt(tokenizer, text, bool(chat[row]), want_offsets)
        if 0 < truncate[row] < len(ids):  # keep the last tokens (TGIS)
            ids, offsets = ids[-truncate[row]:], offsets and offsets[-truncate[row]:]
            text = tokenizer.decode(ids)
        rows.append((ids, text, offsets))
    width = max(1, max(len(ids) for ids, _, _ in rows))
    padded = np.zeros((batch, width), dtype=np.int32)
    tokens = np.full((batch, width if want_tokens else 0), b"", dtype=np.object_)
    spans = np.full((batch, width if want_offsets else 0, 2), -1, dtype=np.int32)
    for row, (ids, _, offsets) in enumerate(rows):
        padded[row, :len(ids)] = ids
        if want_tokens:
            tokens[row, :len(ids)] = [t.encode() for t in tokenizer.convert_ids_to_tokens(ids)]
        if want_offsets:
            spans[row, :len(ids)] = offsets
    lengths = np.array([[len(ids)] for ids, _, _ in rows], dtype=np.int32)
    return {
        "_input_ids": padded,
        "_input_lengths": lengths,
        "_prompt_text": np.array([[text.encode()] for _, text, _ in rows], dtype=np.object_),
        "token_count": lengths,
        "input_ids": padded,
        "tokens": tokens,
        "offsets": spans,
    }
