"""Per-request generation parameters, validated when built (errors name the parameter)."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 20  # TGIS's default max_new_tokens


class RequestError(ValueError):
    """A request the server refuses; the message is sent to the client as is."""


@dataclass(frozen=True)
class SamplingParams:
    """do_sample False means greedy; the other fields then only matter for the penalties."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0               # 0: disabled
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclass(frozen=True)
class StoppingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                               f"got {self.min_tokens}")


@dataclass(frozen=True)
class RequestParams:
    sampling: SamplingParams
    stopping: StoppingParams
    stream: bool = False
    exclude_input_in_output: bool = True
