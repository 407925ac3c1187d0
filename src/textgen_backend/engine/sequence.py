"""A sequence's token-level state inside the engine (text lives in the output processor)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    details: DetailsParams = DetailsParams()
    track_logprobs: bool = False      # chosen tokens' logprobs are needed (details, best_of)
    input_details_done: bool = False  # prompt details are computed at the first prefill only
    scheduled_at: float | None = None  # time.monotonic() of its first prefill (metrics)
    adapter: AdapterRef | None = None  # LoRA adapter; None = the base model
    adapter_slot: int = -1             # its device slot while running

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]
