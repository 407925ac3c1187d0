"""Incremental detokenization: a growing list of generated token ids -> streamed text deltas."""
from __future__ import annotations

import functools
from collections.abc import Sequence

# Prompt tokens decoded as context (vLLM and TGI use 5): SentencePiece decoders drop the leading
# space of the first token of a decode, so the first generated token needs something before it.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"
BYTE_PIECES = tuple(f"<0x{byte:02X}>" for byte in range(256))


@functools.lru_cache(maxsize=8)
def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of the SentencePiece byte-fallback pieces `<0x00>`..`<0xFF>` (empty for byte-level BPE)."""
    ids = [i for i in tokenizer.convert_tokens_to_ids(list(BYTE_PIECES)) if i is not None]
    # Unknown pieces map to the unk id: keep only ids whose piece really is a byte piece.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return frozenset(i for i, piece in zip(ids, pieces) if piece in BYTE_PIECES)


class IncrementalDetokenizer:
    """Turns generated token ids, appended step by step, into text deltas.

    Each step decodes two short windows of ids, [prefix_offset:read_offset] (text already emitted)
    and [prefix_offset:], and emits what the second adds to the first (vLLM/TGI-style), so that
    tokens whose text depends on their neighbours (byte pieces, SentencePiece's dropped leading
    space) come out as in a full decode. Text is held back while it ends in U+FFFD (a character
    still incomplete) or while the last token is a byte-fallback piece: tokenizers' ByteFallback
    decoder turns a whole run of byte pieces into one U+FFFD per byte when the run is not valid
    UTF-8, so a run's text is final only once the run has ended. A newline that is a byte piece
    (SentencePiece models) therefore comes out with the next token.

    Oracle, with ctx = prompt_ids[-PROMPT_CONTEXT_TOKENS:] and
    decode = tokenizer.decode(..., skip_special_tokens=True, clean_up_tokenization_spaces=False):
        "".join(step(...) for each chunk) + flush() == decode(ctx + gen)[len(decode(ctx)):]
    For byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen) this equals decode(gen). The clean-up
    of spaces before punctuation is never applied: it rewrites text across token boundaries,
    and transformers 5 ignores it for BPE models anyway.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Fast tokenizers: the Rust decoder directly (what tokenizer.decode calls, without
            # its per-call Python overhead).
            self._decode = functools.partial(backend.decode, skip_special_tokens=True)
        else:
            self._decode = functools.partial(tokenizer.decode, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
        self._byte_ids = byte_fallback_ids(tokenizer)
        self._ids = [int(i) for i in prompt_ids[-PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def step(self, new_ids: Sequence[int]) -> str:
        """Appends new token ids; returns the text they made final ("" while it is held back)."""
        self._ids.extend(new_ids)
        text = self._decode(self._ids[self._prefix_offset:])
        if (len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR)
                or self._ids[-1] in self._byte_ids):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """At the end of generation: the text still held back."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids[self._prefix_offset:]))

    def _advance(self, text: str) -> str:
        """Emits text past the prefix window; the ids just read become the next prefix window."""
        delta = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return delta
