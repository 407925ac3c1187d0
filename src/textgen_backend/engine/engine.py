"""The token-level engine: model, KV cache, scheduler and the explicit step (with async
scheduling, the next step launched before the current one's tokens are read).

`Engine` is thread-free (tests drive it directly); `serving/engine_process.py` runs its step
loop in a process of its own, and `serving/service.py` turns its token outputs into responses.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from textgen_backend.adapters.catalog import AdapterCatalog
from textgen_backend.adapters.residency import AdapterResidency
from textgen_backend.adapters.shard_loads import ShardedAdapterLoads
from textgen_backend.config import (MAX_SPECULATE, EngineConfig, EngineLimits,
                                    resolve_token_limits)
from textgen_backend.engine.async_steps import reads_history
from textgen_backend.engine.block_manager import BlockManager
from textgen_backend.engine.cuda_graphs import mixed_shapes, prefill_shapes, verify_shapes
from textgen_backend.engine.faults import OOM_CAP_STEPS, FaultInjector, is_out_of_memory
from textgen_backend.engine.loading import build_runner, check_shardable, choose_dtype
from textgen_backend.engine.model_runner import LaunchedStep
from textgen_backend.engine.scheduler import (AdvancedStep, Scheduler, SchedulerOutput,
                                              StepOutput)
from textgen_backend.engine.sequence import Sequence
from textgen_backend.engine.stats import EngineStats, StepStats
from textgen_backend.models.config import ModelConfig
from textgen_backend.parallel.group import ShardGroup, world_size
from textgen_backend.prompt_tuning.cache import PromptCache
from textgen_backend.sampling.grammar import GrammarMatchers
from textgen_backend.sampling.params import SamplingParams, StoppingParams
from textgen_backend.speculation.medusa import load_medusa, medusa_num_heads
from textgen_backend.speculation.speculator import Speculator

logger = logging.getLogger("textgen")


class Engine:
    def __init__(self, config: EngineConfig, model_dir: Path, device: torch.device | None = None):
        if config.speculate is None:  # TGI: a Medusa model speculates with all its heads
            heads = medusa_num_heads(model_dir)
            if heads > MAX_SPECULATE:
                logger.warning("[textgen] %d Medusa heads: drafting with %d (--speculate's "
                               "most)", heads, MAX_SPECULATE)
            config = dataclasses.replace(config, speculate=min(heads, MAX_SPECULATE))
        self.config = config
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model_config = ModelConfig.from_dir(model_dir).with_rope_override(
            config.rope_scaling, config.rope_factor)
        self.dtype = choose_dtype(config, self.model_config, self.device)
        started = time.monotonic()
        shards = world_size(config)
        self.shards = None
        if shards > 1:
            check_shardable(config, self.model_config, model_dir, shards, self.device)
            self.shards = ShardGroup(config, model_dir, self.device, shards,
                                     f"{build_runner.__module__}:build_runner")
        try:
            self._start(model_dir, started)
        except BaseException:
            self.close()
            raise

    def _start(self, model_dir: Path, started: float) -> None:
        """Loads the model (every rank its shard), sizes the KV cache, compiles and captures."""
        config = self.config
        self.runner = build_runner(config, model_dir, self.device,
                                   self.shards.tp if self.shards else None)
        self.runner.shards = self.shards
        if self.runner.kv_cache_dtype != self.dtype:
            scaled = self.runner.model.attention_layers()[0].k_scale != 1.0
            logger.info("[textgen] KV cache in float8 e4m3 (%s)",
                        "the checkpoint's per-layer scales" if scaled
                        else "no scales in the checkpoint: saturating at +-448")
        model, eos = self.runner.model, self.model_config.eos_token_ids
        self.adapters = self._adapter_residency()
        self.runner.medusa = (load_medusa(model_dir, self.model_config.hidden_size,
                                          self.model_config.vocab_size, self.dtype, self.device)
                              if config.speculate else None)
        loaded = time.monotonic()
        self.limits = self._resolve_limits()
        self.runner.allocate_kv_cache(self.limits.num_kv_blocks)
        kernels = model.layers[0].self_attn.attn.ops.name
        if kernels == "triton":
            self._compile_prefill_kernels()
            max_blocks = -(-self.limits.max_total_tokens // config.block_size)
            sizes = [b for b in config.cuda_graph_batch_sizes
                     if config.max_batch_size is None or b <= config.max_batch_size]
            prefill = tuple(t for t in config.prefill_graph_token_counts
                            if t <= self.limits.max_batch_prefill_tokens)
            # mixed steps (decode rows beside prompt chunks) come with chunked prefill only
            mixed = mixed_shapes(tuple(sizes), prefill) if self.limits.chunked_prefill else []
            verify = (verify_shapes(tuple(b for b in sizes
                                          if b <= config.speculation_max_batch_size),
                                    self._num_drafts()) if config.speculate else [])
            self.runner.capture_cuda_graphs(tuple(sizes), prefill_shapes(prefill) + mixed,
                                            verify, max_blocks)
        self.block_manager = BlockManager(self.limits.num_kv_blocks, config.block_size,
                                          config.prefix_caching)
        self.prompts = PromptCache(config.prompt_cache_size_mb * 2**20, self.dtype, self.device)
        self.grammars = None if config.disable_grammar_support else self._grammars(model_dir)
        self.limits = dataclasses.replace(self.limits, grammar_support=self.grammars is not None)
        self.runner.grammars = self.grammars
        self.scheduler = Scheduler(self.limits, self.block_manager, eos, self.adapters,
                                   self.prompts, self.grammars)
        self.speculator = self._speculator()
        self.faults = FaultInjector.from_env()  # tests only (faults.py)
        self._good_steps = 0
        self._aborted: list[StepOutput] = []
        self._ahead: _InFlight | None = None  # launched, not read yet (async scheduling)
        self.last_step: StepStats | None = None   # the latest step(), if it ran the model
        # What a newcomer waits for, part by part (the launcher logs tritonserver's total).
        logger.info("[textgen] loaded %s (%s, %s, %s kernels) in %.1fs; KV cache sizing, kernel "
                    "compilation and warm-up %.1fs; KV cache: %d tokens",
                    self.model_config.architecture, self.device, self.dtype, kernels,
                    loaded - started, time.monotonic() - loaded,
                    self.limits.max_batch_total_tokens)

    def _num_drafts(self) -> int:
        """--speculate, or the Medusa heads there are when fewer."""
        medusa = self.runner.medusa
        return min(self.config.speculate, medusa.num_heads if medusa else self.config.speculate)

    def _speculator(self) -> Speculator | None:
        c, medusa = self.config, self.runner.medusa
        if not c.speculate:
            return None
        drafts = self._num_drafts()
        if drafts < c.speculate:
            logger.warning("[textgen] --speculate %d: the model has %d Medusa heads, so %d "
                           "drafts per step", c.speculate, drafts, drafts)
        method = "medusa" if medusa is not None else "ngram"
        logger.info("[textgen] speculative decoding: %d %s drafts per step, at most %d "
                    "sequences", drafts, method, c.speculation_max_batch_size)
        return Speculator(drafts, c.speculation_max_batch_size, method, self.block_manager)

    def _adapter_residency(self) -> AdapterResidency | None:
        """The adapters preloaded with --adapter-id, and who loads the others; None with
        --max-lora-rank 0."""
        c, slots = self.config, self.runner.adapter_slots
        if slots is None:
            return None
        catalog = AdapterCatalog(c, self.model_config)
        residency = AdapterResidency(slots, catalog.load, c.adapter_cycle_time_s,
                                     shard_loads=ShardedAdapterLoads(self.shards)
                                     if self.shards else None)
        for adapter_id in c.preloaded_adapters:
            residency.preload(catalog.resolve(adapter_id, c.adapter_source, ""))
        if c.preloaded_adapters:
            logger.info("[textgen] preloaded adapters %s", ", ".join(c.preloaded_adapters))
        return residency

    def _grammars(self, model_dir: Path) -> GrammarMatchers | None:
        """Grammar matchers over the model's tokenizer, or None (with a warning) when llguidance
        cannot use that tokenizer: constrained requests are then refused, others served."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                model_dir, trust_remote_code=self.config.trust_remote_code)
            return GrammarMatchers(tokenizer, max(self.model_config.vocab_size, len(tokenizer)))
        except Exception as exc:  # noqa: BLE001 - any failure only disables grammars
            logger.warning("[textgen] grammar support is off: llguidance cannot use this "
                           "model's tokenizer (%s)", exc)
            return None

    def _resolve_limits(self) -> EngineLimits:
        c = self.config
        max_input, max_total, prefill = resolve_token_limits(
            c, self.model_config.max_position_embeddings)
        if c.max_batch_total_tokens is not None:
            num_blocks = -(-c.max_batch_total_tokens // c.block_size)
        elif self.device.type == "cuda":
            # More than every admissible request at full length could never be used.
            useful = -(-c.max_concurrent_requests * max_total // c.block_size)
            num_blocks = min(self._blocks_that_fit(prefill, max_input), useful)
        else:
            num_blocks = -(-4 * max_total // c.block_size)
        if num_blocks * c.block_size < max_total:
            raise ValueError(f"the KV cache holds {num_blocks * c.block_size} tokens, fewer than "
                             f"max_total_tokens {max_total}: lower max_total_tokens")
        return EngineLimits(max_input_tokens=max_input, max_total_tokens=max_total,
                            max_batch_prefill_tokens=prefill, num_kv_blocks=num_blocks,
                            block_size=c.block_size, max_batch_size=c.max_batch_size,
                            max_waiting_tokens=c.max_waiting_tokens,
                            waiting_served_ratio=c.waiting_served_ratio,
                            chunked_prefill=c.chunked_prefill)

    def _blocks_that_fit(self, prefill_tokens: int, max_input: int) -> int:
        """KV blocks that fit in GPU memory after a warm-up prefill of the largest size: prompts
        of at most max_input tokens (one longer than the model's positions would index past
        its rotary table)."""
        warmups = self._warmup_prompts([min(max_input, prefill_tokens - start)
                                        for start in range(0, prefill_tokens, max_input)])
        self.runner.allocate_kv_cache(sum(len(s.block_ids) for s in warmups) + 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.runner.execute(SchedulerOutput(warmups, is_prefill=True))
        torch.cuda.synchronize()
        activation_peak = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        self.runner.allocate_kv_cache(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        budget = total * self.config.cuda_memory_fraction - (total - free) - activation_peak
        num_blocks = int(budget // self.runner.kv_bytes_per_block())
        if num_blocks < 1:
            raise RuntimeError("no GPU memory left for the KV cache after loading the model")
        return num_blocks

    def _warmup_prompts(self, lengths: list[int], blocks: int | None = None) -> list[Sequence]:
        """Prompts of these lengths (token 0 repeated) on consecutive KV blocks from block 0,
        up to the first that would need more than `blocks` blocks in all."""
        bs, seqs, next_block = self.config.block_size, [], 0
        for n in lengths:
            needed = -(-n // bs)
            if blocks is not None and next_block + needed > blocks:
                break
            seq = Sequence(-1, [0] * n, SamplingParams(), StoppingParams(max_tokens=1))
            seq.block_ids = list(range(next_block, next_block + needed))
            next_block += needed
            seqs.append(seq)
        return seqs

    def _compile_prefill_kernels(self) -> None:
        """Runs small prefills of assorted shapes so that Triton compiles the variants it
        specializes on (query tile sizes, 16-divisible lengths and strides) now, not in the
        middle of serving; compiled kernels are cached on disk for later starts."""
        started = time.monotonic()
        for lengths in ([1], [16], [17], [40, 9], [100, 33, 2], [256], [300, 70]):
            budget = self.limits.max_batch_prefill_tokens // len(lengths)
            seqs = self._warmup_prompts([min(n, budget) for n in lengths],
                                        self.limits.num_kv_blocks)
            if seqs:
                self.runner.execute(SchedulerOutput(seqs, is_prefill=True))
        if self.limits.chunked_prefill:
            self._compile_mixed_step()
        if self.adapters is not None:
            self.runner.compile_adapter_kernels(self._largest_step_tokens())
        logger.info("[textgen] prefill kernels compiled in %.1fs", time.monotonic() - started)

    def _largest_step_tokens(self) -> int:
        """The most tokens a step may carry: a prefill budget's worth (or a whole prompt that
        wants its tokens' details) beside a decode row, with drafts, for every other
        sequence that may run."""
        c, limits = self.config, self.limits
        running = min(limits.max_batch_size or c.max_concurrent_requests,
                      c.max_concurrent_requests, limits.num_kv_blocks)
        prompt = max(limits.max_batch_prefill_tokens, limits.max_input_tokens)
        return prompt + running * (1 + (c.speculate or 0))

    def _compile_mixed_step(self) -> None:
        """A chunked step's shape: a decoding row beside the last chunk of a prompt whose
        earlier chunks are in the cache (the H200's first such step in a run took 1.6 s)."""
        bs = self.config.block_size
        decoding = Sequence(-1, [0] * 40, SamplingParams(), StoppingParams(max_tokens=2))
        decoding.output_ids, decoding.num_computed_tokens = [0], 40
        chunk = Sequence(-1, [0] * 300, SamplingParams(), StoppingParams(max_tokens=1))
        chunk.num_computed_tokens = 256
        decoding.block_ids = list(range(-(-41 // bs)))
        chunk.block_ids = list(range(len(decoding.block_ids),
                                     len(decoding.block_ids) + -(-300 // bs)))
        if chunk.block_ids[-1] < self.limits.num_kv_blocks:
            self.runner.execute(SchedulerOutput([decoding, chunk], True, [1, 44]))

    # --- the step -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq_id: int, reason: str) -> None:
        output = self.scheduler.abort(seq_id, reason)
        if output is not None:
            self._aborted.append(output)

    def stats(self) -> EngineStats:
        bm, running = self.block_manager, self.scheduler.running
        return EngineStats(num_running=len(running),
                           num_waiting=len(self.scheduler.waiting),
                           batch_tokens=sum(s.num_tokens for s in running),
                           batch_max_remaining_tokens=max(
                               (s.stopping.max_tokens - len(s.output_ids) for s in running),
                               default=0),
                           kv_blocks_used=bm.num_blocks - bm.num_free_blocks,
                           kv_blocks_total=bm.num_blocks,
                           num_preemptions=self.scheduler.num_preemptions,
                           num_prefill_limit_hits=self.scheduler.num_prefill_limit_hits,
                           prefix_cache_query_tokens=bm.query_tokens,
                           prefix_cache_hit_tokens=bm.hit_tokens,
                           prefix_cache_blocks=bm.num_cached_blocks,
                           prefix_cache_evictions=bm.evictions,
                           **self._adapter_stats(), **self._prompt_stats(),
                           **self._speculation_stats())

    def _speculation_stats(self) -> dict:
        if self.speculator is None:
            return {}
        counters = self.speculator.counters
        return dict(speculation_method=counters.method,
                    speculation_draft_tokens=counters.draft_tokens,
                    speculation_accepted_tokens=counters.accepted_tokens,
                    speculation_verify_rows=counters.verify_rows)

    def _prompt_stats(self) -> dict:
        counters = self.prompts.counters
        seconds, counters.load_seconds = tuple(counters.load_seconds), []
        return dict(prompt_load_failures=counters.failures, prompt_load_seconds=seconds)

    def _adapter_stats(self) -> dict:
        if self.adapters is None:
            return {}
        counters = self.adapters.counters
        seconds, counters.load_seconds = tuple(counters.load_seconds), []
        return dict(active_adapters=self.adapters.num_active, adapter_loads=counters.loads,
                    adapter_evictions=counters.evictions, adapter_load_failures=counters.failures,
                    adapter_load_seconds=seconds)

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (nothing else outlives the process)."""
        if self.shards is not None:
            self.shards.close()
            self.shards = None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted) or self._ahead is not None

    def _recover(self, out: SchedulerOutput, exc: Exception) -> list[StepOutput]:
        """After a step that raised: out of memory, the newest half of its sequences wait to be
        recomputed; otherwise (or for a lone sequence) exactly its sequences fail."""
        if is_out_of_memory(exc):
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(out.seqs) > 1:
                preempted = self.scheduler.shrink_after_oom(out.seqs)
                self._good_steps = 0
                logger.warning("[textgen] a step of %d sequences ran out of memory: %d wait to "
                               "be recomputed, the batch is capped at %d", len(out.seqs),
                               preempted, self.scheduler.oom_batch_cap)
                return []
            error = f"generation failed: out of memory for this sequence alone ({exc})"
        else:
            error = f"generation failed: {type(exc).__name__}: {exc}"
        logger.error("[textgen] a step of %d sequences failed: %s", len(out.seqs), error,
                     exc_info=exc)
        outputs = []
        for seq in out.seqs:
            # (a step launched ahead may hold sequences that the step before it finished)
            if self.scheduler.abort(seq.seq_id, "error") is not None:
                outputs.append(StepOutput(seq.seq_id, [], "error", error))
        return outputs

    def _lift_oom_cap(self) -> None:
        """After OOM_CAP_STEPS good steps an out-of-memory cap on the batch doubles, and goes
        once it no longer binds."""
        if self.scheduler.oom_batch_cap is None:
            return
        self._good_steps += 1
        if self._good_steps >= OOM_CAP_STEPS:
            self._good_steps = 0
            cap = 2 * self.scheduler.oom_batch_cap
            busy = len(self.scheduler.running) + len(self.scheduler.waiting)
            self.scheduler.oom_batch_cap = None if cap >= busy else cap

    def fail_all(self, error: str) -> list[StepOutput]:
        """Finishes every sequence with an error (a failed step, or shutdown)."""
        seq_ids = [s.seq_id for s in list(self.scheduler.waiting) + self.scheduler.running]
        outputs, self._aborted, self._ahead = self._aborted, [], None
        for seq_id in seq_ids:
            self.scheduler.abort(seq_id, "error")
            outputs.append(StepOutput(seq_id, [], "error", error))
        return outputs

    def _fail_loads(self) -> list[StepOutput]:
        """Finishes loads of adapters and soft prompts; waiting sequences whose adapter or
        prompt failed to load get the error."""
        failed = [(f"adapter {ref.name!r}", lambda s, k=ref.key: s.adapter and s.adapter.key == k,
                   error) for ref, error in (self.adapters.poll() if self.adapters else [])]
        failed += [(f"prefix_id {ref.prefix_id!r}",
                    lambda s, k=ref.key: s.prefix and s.prefix.key == k, error)
                   for ref, error in self.prompts.poll()]
        outputs = []
        for what, uses, error in failed:
            for seq in [s for s in self.scheduler.waiting if uses(s)]:
                self.scheduler.abort(seq.seq_id, "error")
                outputs.append(StepOutput(seq.seq_id, [], "error",
                                          f"{what} failed to load: {error}"))
        return outputs

    def step(self) -> list[StepOutput]:
        """Runs one step and returns every sequence's news. With async scheduling the step
        after it is launched before its tokens are read (async_steps.py); the news is then of
        the step launched by the call before."""
        outputs, self._aborted = self._aborted, []
        outputs += self._fail_loads()
        current, self._ahead = self._ahead or self._launch(), None
        self.last_step = current.stats if current else None
        if current is None:
            return outputs
        if self._can_look_ahead(current):
            self._ahead = self._launch(current.launched)
        outputs += self._read(current)
        if self._ahead is not None and self._ahead.error is not None:
            # launched ahead and failed: recovered once the step before it is read
            failed, self._ahead = self._ahead, None
            outputs += self._read(failed)
            current.stats.failure = failed.stats.failure
        return outputs

    def _can_look_ahead(self, current: _InFlight) -> bool:
        """Whether the next step may be launched before the current one's tokens are read:
        nothing it decides may depend on their values (async_steps.py). A step with drafts
        leaves even their number unknown (how many are accepted)."""
        return (self.config.async_scheduling and current.error is None
                and current.scheduled.draft_ids is None and self.shards is None
                and (self.speculator is None
                     or not self.speculator.drafts_for(len(self.scheduler.running)))
                and not any(reads_history(s) for s in self.scheduler.running)
                and self.scheduler.decode_slots_fit())

    def _launch(self, previous: LaunchedStep | None = None) -> _InFlight | None:
        """Schedules a step and queues it on the device (an exception is kept for _read)."""
        started = time.perf_counter()
        was_running = bool(self.scheduler.running)
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return None
        if self.speculator is not None and previous is None:  # drafts need the tokens' values
            self.speculator.attach(scheduled)
        flight = _InFlight(scheduled, StepStats(
            scheduled.is_prefill, len(scheduled.seqs),
            sum(scheduled.num_new_tokens) if scheduled.is_prefill else len(scheduled.seqs),
            scheduled.is_prefill and was_running), started)
        try:
            if self.faults is not None:
                self.faults.before_forward()
            flight.launched = self.runner.launch(scheduled, previous)
        except Exception as exc:  # the step's sequences pay, not the server (faults.py)
            flight.error = exc
            return flight
        flight.advanced = self.scheduler.advance(scheduled)
        return flight

    def _read(self, flight: _InFlight) -> list[StepOutput]:
        """Waits for a launched step's tokens and updates its sequences."""
        step = flight.stats
        if flight.error is None:
            try:
                result = flight.launched.result()
            except Exception as exc:
                flight.error = exc
        if flight.error is not None:
            step.failure = "oom" if is_out_of_memory(flight.error) else "error"
            step.total_seconds = time.perf_counter() - flight.started
            return self._recover(flight.scheduled, flight.error)
        forward_done = time.perf_counter()
        self._lift_oom_cap()
        news = self.scheduler.resolve(flight.scheduled, flight.advanced, result.sampled,
                                      result.prompt_logprobs, result.next_drafts)
        if self.speculator is not None:
            self.speculator.record(flight.scheduled, news)
        step.forward_seconds = forward_done - flight.started
        step.tokproc_seconds = time.perf_counter() - forward_done
        step.total_seconds = time.perf_counter() - flight.started
        return news


@dataclass
class _InFlight:
    """A step launched and not read yet, or whose launch raised."""
    scheduled: SchedulerOutput
    stats: StepStats
    started: float                    # time.perf_counter() when it was scheduled
    launched: LaunchedStep | None = None
    advanced: AdvancedStep | None = None
    error: Exception | None = None
