"""Grammar-constrained decoding (JSON schema, regex, choice, Lark / EBNF) through llguidance.

Why llguidance: one abi3 wheel without runtime dependencies, token masks filled for a whole
batch in parallel, lazy compilation (a schema costs little before its first token), and it was
right on every constraint tried (xgrammar let raw control characters into bounded strings,
outlines-core ignored integer bounds: ../shared/FACTS.md). Its masks are int32 words with a bit
set per allowed token, as the other two libraries', so swapping it would stay inside this file.

Request forms (serving/request.py hands their values here): TGI's `grammar` {"type", "value"},
TensorRT-LLM's `guided_decoding_guide_type` + `guided_decoding_guide`, and vLLM's
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` / `structured_outputs`.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

from textgen_backend.sampling.params import RequestError

# TGI's grammar types -> llguidance's formats
_TGI_TYPES = {"json": "json_schema", "json_schema": "json_schema", "regex": "regex",
              "grammar": "lark", "lark": "lark", "ebnf": "lark"}
# TensorRT-LLM's guide types
_TRT_TYPES = {"json": "json", "json_schema": "json_schema", "regex": "regex",
              "ebnf_grammar": "lark"}
# vLLM's keys, and structured_outputs' own
_VLLM_KEYS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
              "guided_grammar": "lark"}
_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice",
                    "grammar": "lark"}
REQUEST_KEYS = ("grammar", "guided_decoding_guide_type", "guided_decoding_guide",
                *_VLLM_KEYS, "structured_outputs")
ANY_JSON = {"type": ["object", "array", "string", "number", "integer", "boolean", "null"]}
# JSON is generated compact ("a": 1, "b": [1, 2]) unless a schema's own "x-guidance" says
# otherwise: free whitespace lets a model pad its output with newlines until max_tokens.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """A checked constraint: llguidance's grammar text (what the engine compiles)."""
    text: str
    kind: str            # json_schema, regex, choice or lark (for errors and docs)


def _text(kind: str, value) -> str:
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RequestError(f"the json_schema constraint is not valid JSON: {exc}") \
                    from None
        if isinstance(value, dict) and "x-guidance" not in value:
            value = {**value, "x-guidance": COMPACT_JSON}
        return json.dumps(value)
    if kind == "choice" and not isinstance(value, str):
        return json.dumps(value)
    if not isinstance(value, str):
        raise RequestError(f"a {kind} constraint must be a string, got {type(value).__name__}")
    return value


def grammar_from_request(values: dict, enabled: bool) -> Grammar | None:
    """Pops every grammar key from a row's parameter values; the one constraint they give, checked
    (RequestError naming the problem), or None."""
    given = {key: values.pop(key) for key in REQUEST_KEYS if key in values}
    given = {k: v for k, v in given.items() if v not in ("", None)}
    if not given:
        return None
    if not enabled:
        raise RequestError(f"{', '.join(sorted(given))}: grammar support is off on this "
                           "server (--disable-grammar-support, or a tokenizer llguidance cannot "
                           "use: see its log)")
    kind, value = _one_constraint(given)
    try:
        grammar = llguidance.grammar_from(kind if kind != "json" else "json_schema",
                                          _text("json_schema", ANY_JSON) if kind == "json"
                                          else _text(kind, value))
    except ValueError as exc:
        raise RequestError(f"grammar: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise RequestError(f"the {kind} constraint is invalid: {error.strip()}")
    return Grammar(grammar, "json_schema" if kind == "json" else kind)


def _one_constraint(given: dict) -> tuple[str, object]:
    trt = {"guided_decoding_guide_type", "guided_decoding_guide"} & set(given)
    forms = (["grammar"] if "grammar" in given else []) + (["guided_decoding_guide_*"] if trt
                                                          else []) + sorted(
        k for k in given if k in _VLLM_KEYS or k == "structured_outputs")
    if len(forms) > 1:
        raise RequestError(f"give one constraint, got {', '.join(forms)}")
    if "grammar" in given:
        spec = given["grammar"]
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise RequestError(f"grammar is not valid JSON: {exc}") from None
        if not isinstance(spec, dict) or spec.get("type") not in _TGI_TYPES or "value" not in spec:
            raise RequestError("grammar must be {\"type\": one of "
                               f"{', '.join(_TGI_TYPES)}, \"value\": ...}}")
        return _TGI_TYPES[spec["type"]], spec["value"]
    if trt:
        guide_type = given.get("guided_decoding_guide_type")
        if guide_type not in _TRT_TYPES:
            raise RequestError(f"guided_decoding_guide_type must be one of "
                               f"{', '.join(_TRT_TYPES)}, got {guide_type!r}")
        if guide_type != "json" and "guided_decoding_guide" not in given:
            raise RequestError(f"guided_decoding_guide_type {guide_type} needs "
                               "guided_decoding_guide")
        return _TRT_TYPES[guide_type], given.get("guided_decoding_guide", "")
    key = forms[0]
    if key == "structured_outputs":
        spec = given[key]
        chosen = [k for k in _STRUCTURED_KEYS if isinstance(spec, dict) and k in spec]
        if len(chosen) != 1:
            raise RequestError("structured_outputs must hold exactly one of "
                               f"{', '.join(_STRUCTURED_KEYS)}")
        return _STRUCTURED_KEYS[chosen[0]], spec[chosen[0]]
    return _VLLM_KEYS[key], given[key]


class GrammarMatchers:
    """Engine side: compiles grammars on a worker thread (a cache of compiled matchers keyed by
    grammar; each sequence gets its own copy), fills the step's token masks, and advances each
    sequence's matcher by the token it sampled."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self._executor = llguidance.LLExecutor()
        self._compiled: dict[str, llguidance.LLMatcher] = {}
        self._compiling: dict[str, Future] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="textgen-grammar")

    def ready(self, grammar: Grammar) -> bool:
        """Whether sequences with `grammar` may be admitted now; if not, it is compiled."""
        if grammar.text in self._compiled:
            return True
        future = self._compiling.get(grammar.text)
        if future is None:
            self._compiling[grammar.text] = self._worker.submit(self.compile, grammar)
            return False
        if not future.done():
            return False
        self._compiled[grammar.text] = future.result()
        del self._compiling[grammar.text]
        return True

    def compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A matcher at the grammar's start (llguidance compiles lazily: part of the work
        comes with the first masks)."""
        return llguidance.LLMatcher(self._tokenizer, grammar.text)

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A fresh matcher for an admitted sequence."""
        return self._compiled[grammar.text].deep_copy()

    def masks(self, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor | None:
        """[rows, ceil(V / 32)] int32 allowed-token bits for the step's sampled rows (rows
        without a matcher allow everything), or None when no row is constrained."""
        rows = [(m, row) for row, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        # (not llguidance.torch: it runs torch.compile at import)
        bitmask = torch.full((len(matchers), -(-self.vocab_size // 32)), -1, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4,
                                               len(matchers))
        return bitmask

    @staticmethod
    def apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Sets the logits [rows, V] of disallowed tokens to -inf, in place (one pass for the
        batch): bit b of word w allows token 32 w + b."""
        words = bitmask.to(logits.device, non_blocking=True)
        bits = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((words[:, :, None] >> bits) & 1).reshape(len(words), -1)
        logits.masked_fill_(allowed[:, :logits.shape[1]] == 0, float("-inf"))
