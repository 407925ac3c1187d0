"""What the engine reports about itself: each step's StepStats and the statistics after it (the
serving side turns them into metrics)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    batch_tokens: int                 # prompt + generated tokens of the running sequences
    batch_max_remaining_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int              # since start
    num_prefill_limit_hits: int       # since start
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hit_tokens: int = 0    # of which found there (not computed), since start
    prefix_cache_blocks: int = 0        # blocks registered in the prefix cache
    prefix_cache_evictions: int = 0     # cached blocks reused for other tokens, since start
    active_adapters: int = 0          # adapters holding a device slot
    adapter_loads: int = 0            # since start
    adapter_evictions: int = 0        # since start
    adapter_load_failures: int = 0    # since start
    adapter_load_seconds: tuple[float, ...] = ()  # loads finished since the previous stats
    prompt_load_failures: int = 0     # soft prompts, since start
    prompt_load_seconds: tuple[float, ...] = ()   # soft prompt loads since the previous stats
    speculation_method: str = ""      # "ngram" or "medusa"; "" without --speculate
    speculation_draft_tokens: int = 0     # since start
    speculation_accepted_tokens: int = 0  # since start
    speculation_verify_rows: int = 0      # sequence-steps that carried drafts, since start

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class StepStats:
    """One engine step, filled in by Engine.step (time.perf_counter() seconds)."""
    is_prefill: bool
    batch_size: int
    num_tokens: int                   # tokens computed: whole prompts in a prefill
    joined_running_batch: bool        # a prefill while other sequences were running
    forward_seconds: float = 0.0      # scheduled to tokens read (a step launched ahead within)
    tokproc_seconds: float = 0.0      # scheduler.resolve: appending tokens, finishing
    total_seconds: float = 0.0
    failure: str | None = None        # "oom" or "error": the step raised (engine/faults.py)
