"""IncrementalDetokenizer against full decodes, over real and synthetic tokenizers."""
import pytest

import assets
from textgen_backend.serving.detokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer

pytestmark = pytest.mark.unit

TOKENIZERS = {
    "gpt2": assets.gpt2_tokenizer,
    "qwen3": assets.qwen3_tokenizer,
    "mistral": assets.mistral_tokenizer,
    "mistral-converted": assets.mistral_converted_tokenizer,
    "byte-level-bpe": assets.byte_level_bpe_tokenizer,
    "sentencepiece-bpe": assets.sentencepiece_bpe_tokenizer,
}
BYTE_LEVEL = ["gpt2", "qwen3", "byte-level-bpe"]
SENTENCEPIECE = ["mistral", "mistral-converted", "sentencepiece-bpe"]
TEXTS = [
    "Hi 日本語 😀!",
    "Café crème brûlée — naïve façade; Zürich, São Paulo, Ærøskøbing.",
    "  Leading spaces,  two,   three    four.\n\nNew paragraph\n\tindented line\n",
    "中文：北京是中国的首都。한국어 문장. 東京タワー 🗼 emoji 👍🏽🎉🦜 family 👨‍👩‍👧.",
    "Digits 0123456789 3.14159 1,000,000 2024-06-01 42% x² ≈ ∑ → done",
]
PROMPT = "Question: describe the text below.\nAnswer:"


def tokenizer_and_encode(name):
    tokenizer = TOKENIZERS[name]()
    # sentencepiece is the reference encoder for Mistral: the converted tokenizer encodes runs
    # of spaces differently.
    encoder = assets.mistral_tokenizer() if name.startswith("mistral") else tokenizer
    return tokenizer, lambda text: encoder.encode(text, add_special_tokens=False)


def stream(tokenizer, prompt_ids, gen_ids, chunk):
    """The deltas of step() over gen_ids in chunks of `chunk` ids, then flush()."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.step(gen_ids[i:i + chunk]) for i in range(0, len(gen_ids), chunk)]
    return deltas + [detokenizer.flush()]


def expected_text(name, text, with_prompt):
    """What decoding encode(text) gives: the text itself, but after a prompt SentencePiece keeps
    the space its encoder put before the first word."""
    if name == "sentencepiece-bpe" and text.startswith(" "):
        # Metaspace(prepend_scheme="first") puts no "▁" before a text that starts with a space,
        # so the space its decoder strips at the start of a decode is a real one.
        return text if with_prompt else text[1:]
    return (" " if with_prompt and name in SENTENCEPIECE else "") + text


def oracle(tokenizer, prompt_ids, gen_ids):
    # transformers' own decode: the detokenizer's Rust-backend shortcut must give the same text.
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    context = prompt_ids[-PROMPT_CONTEXT_TOKENS:] if prompt_ids else []
    return decode(context + gen_ids)[len(decode(context)):]


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("with_prompt", [False, True], ids=["no-prompt", "prompt"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_equals_full_decode(name, text, with_prompt, chunk):
    tokenizer, encode = tokenizer_and_encode(name)
    prompt_ids = encode(PROMPT) if with_prompt else []
    deltas = stream(tokenizer, prompt_ids, encode(text), chunk)
    assert "".join(deltas) == oracle(tokenizer, prompt_ids, encode(text))
    assert "".join(deltas) == expected_text(name, text, with_prompt)
    assert not [delta for delta in deltas if "\ufffd" in delta]


@pytest.mark.parametrize("name", BYTE_LEVEL)
def test_byte_level_oracle_is_plain_decode(name):
    tokenizer, encode = tokenizer_and_encode(name)
    for text in TEXTS:
        gen_ids = encode(text)
        assert oracle(tokenizer, encode(PROMPT), gen_ids) == tokenizer.decode(gen_ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_special_tokens_are_skipped(name):
    tokenizer, encode = tokenizer_and_encode(name)
    gen_ids = encode("Done.") + [tokenizer.eos_token_id]
    assert tokenizer.eos_token_id not in encode("Done.")
    assert "".join(stream(tokenizer, [], gen_ids, 1)) == "Done."


def test_gpt2_holds_a_character_split_over_three_tokens():
    tokenizer, encode = tokenizer_and_encode("gpt2")
    ids = encode("Hi 日本語 😀!")
    # 日 is E6 97 A5: " \xe6", "\x97", "\xa5" are three tokens, none a character alone.
    assert tokenizer.decode(ids[1:4]) == " 日"
    assert all("\ufffd" in tokenizer.decode([token]) for token in ids[1:4])
    deltas = stream(tokenizer, [], ids, 1)
    assert deltas[:4] == ["Hi", "", "", " 日"]
    assert "".join(deltas) == "Hi 日本語 😀!"


@pytest.mark.parametrize("byte_run, run_first, valid", [
    pytest.param([0xE6, 0x97], True, False, id="invalid-run-then-word"),
    pytest.param([0xE6, 0x97], False, False, id="word-then-invalid-run-at-end"),
    pytest.param([0xE6, 0x97, 0xA5, 0xE6, 0x97], True, False, id="char-then-invalid-in-one-run"),
    pytest.param([0xF0, 0x9F, 0xA6, 0x9C], True, True, id="valid-emoji-run"),
])
@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_byte_fallback_runs_match_full_decode(name, chunk, byte_run, run_first, valid):
    tokenizer, encode = tokenizer_and_encode(name)
    run = [tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>") for byte in byte_run]
    word = encode("Hello")
    gen_ids = run + word if run_first else word + run
    full = tokenizer.decode(gen_ids, skip_special_tokens=True)
    assert ("\ufffd" not in full) == valid
    deltas = stream(tokenizer, [], gen_ids, chunk)
    assert "".join(deltas) == full
    if not run_first:  # in two steps: the word comes out at once, the run only at flush
        detokenizer = IncrementalDetokenizer(tokenizer, [])
        assert [detokenizer.step(word), detokenizer.step(run)] == ["Hello", ""]
        assert detokenizer.flush() == full[len("Hello"):]


@pytest.mark.parametrize("name", SENTENCEPIECE)
def test_first_token_keeps_its_space_after_a_prompt(name):
    tokenizer, encode = tokenizer_and_encode(name)
    prompt_ids = [tokenizer.bos_token_id] + encode("[INST] What is the capital of France? [/INST]")
    gen_ids = encode("The capital of France is Paris.")
    assert tokenizer.convert_ids_to_tokens(gen_ids[:1])[0].startswith("▁")
    deltas = stream(tokenizer, prompt_ids, gen_ids, 1)
    assert deltas[0] == " The"
    assert "".join(deltas) == " The capital of France is Paris."
    # Without a prompt there is nothing to keep the space after, as in a plain decode.
    assert "".join(stream(tokenizer, [], gen_ids, 1)) == "The capital of France is Paris."


class RecordingTokenizer:
    """A slow tokenizer that records the length of every decoded window."""

    def __init__(self, inner):
        self.inner = inner
        self.window_lengths = []

    def decode(self, ids, **kwargs):
        self.window_lengths.append(len(ids))
        return self.inner.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_decodes_short_windows_only():
    tokenizer = RecordingTokenizer(assets.mistral_tokenizer())
    text = " ".join(TEXTS) * 4
    gen_ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, tokenizer.encode(PROMPT, add_special_tokens=False), gen_ids, 1)
    assert "".join(deltas) == " " + text
    assert len(gen_ids) > 400 and max(tokenizer.window_lengths) <= PROMPT_CONTEXT_TOKENS + 6
