"""A sequence's token-level state inside the engine (text lives in the output processor)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from textgen_backend.adapters.catalog import AdapterRef
from textgen_backend.prompt_tuning.store import PrefixRef
from textgen_backend.sampling.grammar import Grammar
from textgen_backend.sampling.params import DetailsParams, SamplingParams, StoppingParams


# A sampled token the host has not read yet (async scheduling: the next step is launched before
# the current one's tokens are read, taking them from the device; engine/async_steps.py).
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: queues find a sequence by itself
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    output_ids: list[int] = field(default_factory=list)  # the newest may be PENDING_TOKEN
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
    prefix: PrefixRef | None = None    # soft prompt: virtual tokens before prompt_ids
    prefix_embeddings: torch.Tensor | None = None  # [num_virtual, hidden], once admitted
    grammar: Grammar | None = None     # a constraint on its output
    matcher: object | None = None      # its grammar's llguidance matcher, once admitted
    num_cached_tokens: int = 0         # KV positions found in the prefix cache at admission
    num_computed_tokens: int = 0       # KV positions written (cached ones included)
    num_registered_blocks: int = 0     # leading blocks registered in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of its full blocks
    next_drafts: list[int] = field(default_factory=list)  # Medusa's guesses for its next step

    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix else 0

    @property
    def num_tokens(self) -> int:
        """KV positions: the soft prompt's virtual tokens, the prompt, the generated tokens."""
        return self.num_virtual_tokens + len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_decoding(self) -> bool:
        """All its tokens but the newest sampled one are in the KV cache."""
        return bool(self.output_ids) and self.num_computed_tokens == self.num_tokens - 1

    @property
    def is_ending(self) -> bool:
        """Its pending token is its last (max_tokens): no step past it is scheduled."""
        return len(self.output_ids) >= self.stopping.max_tokens

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]
