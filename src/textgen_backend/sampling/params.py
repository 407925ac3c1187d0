"""Per-request generation parameters, validated when built (errors name the parameter)."""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 20  # TGIS's default max_new_tokens


class RequestError(ValueError):
    """A request the server refuses; the message is sent to the client as is."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. do_sample False means greedy; the logits processors
    (penalties, bad words, length penalty, watermark) apply either way."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0               # 0: disabled
    top_p: float = 1.0
    typical_p: float = 1.0       # 1: disabled
    min_p: float = 0.0           # 0: disabled
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    # TGIS length penalty: past `start` generated tokens, EOS scores grow by decay**(n - start).
    length_penalty: tuple[int, float] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    watermark: bool = False

    def __post_init__(self):
        # NaN passes every `<` check below; one NaN would make its row's scores NaN.
        for name in ("temperature", "top_p", "typical_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise RequestError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for name in ("top_p", "typical_p"):
            if not 0 < getattr(self, name) <= 1:
                raise RequestError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be in [0, 2^64), got {self.seed}")
        if self.length_penalty is not None:
            start, decay = self.length_penalty
            if start < 0:
                raise RequestError(f"length_penalty_start_index must be >= 0, got {start}")
            if not 1 <= decay <= 10:
                raise RequestError(f"length_penalty_decay_factor must be in [1, 10], got {decay}")

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclass(frozen=True)
class StoppingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = True
    ignore_eos: bool = False
    time_limit_ms: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                               f"got {self.min_tokens}")
        if self.time_limit_ms is not None and self.time_limit_ms < 1:
            raise RequestError(f"time_limit_ms must be >= 1, got {self.time_limit_ms}")


@dataclass(frozen=True)
class DetailsParams:
    """Which per-token details to return (TGI's `details`, TGIS's token info)."""
    log_probs: bool = False       # logprob and rank of each generated token, cumulative logprob
    top_n_tokens: int = 0         # the n most likely tokens at each step, with logprobs
    input_details: bool = False   # the same for the prompt tokens (decoder_input_details)

    @property
    def per_token(self) -> bool:
        return self.log_probs or self.top_n_tokens > 0


@dataclass(frozen=True)
class RequestParams:
    sampling: SamplingParams
    stopping: StoppingParams
    details: DetailsParams = DetailsParams()
    stream: bool = False
    exclude_input_in_output: bool = True
    best_of: int = 1               # candidates generated per prompt
    num_return_sequences: int = 1  # the best ones returned (by cumulative log probability)
