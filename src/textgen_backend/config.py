"""The engine's configuration: one frozen dataclass whose fields are the launcher's flags.

Field names follow TGI's launcher (`max_batch_total_tokens` -> `--max-batch-total-tokens`, env
`MAX_BATCH_TOTAL_TOKENS`). Values that depend on the model or the device (token limits left
unset, the KV block count) are resolved into `EngineLimits`, never written back here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def default_cache_root() -> Path:
    """Where textgen keeps what it builds (the demo model, Triton's compiled kernels):
    $TEXTGEN_CACHE, or ~/.cache/textgen."""
    return Path(os.environ.get("TEXTGEN_CACHE") or Path.home() / ".cache" / "textgen")

# gptq / awq: checkpoints quantized beforehand (weights/quantization.py); the rest quantize a
# dense checkpoint on the fly (quantization/schemes.py).
QUANTIZE = ("gptq", "awq", "eetq", "fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
ADAPTER_SOURCES = ("hub", "local")
LOAD_FORMATS = ("safetensors", "pt", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# Drafts per step: verification costs (N + 1) query rows per sequence; past ~8 the acceptance
# of any proposer we have is too low to pay for them.
MAX_SPECULATE = 8


def flag(help: str, default=None, choices=None, aliases=(), env_aliases=()):
    """Field metadata that `add_flags` turns into an argparse option with a TGI-style env var.
    aliases: more option strings (TGI's `-p`, legacy names); env_aliases: more env vars."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases,
                                            "env_aliases": env_aliases})


def _positive_list(name: str, value: str) -> tuple[int, ...]:
    """"1,4,16" -> (1, 4, 16), sorted and unique; "0" -> ()."""
    if value.strip() == "0":
        return ()
    try:
        sizes = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"{name} must be comma-separated sizes or \"0\", got {value!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{name} sizes must be >= 1, got {value!r}")
    return tuple(sizes)


@dataclass(frozen=True)
class EngineConfig:
    model_id: str = flag("Model directory (config.json, safetensors, tokenizer) or a hub id "
                         "resolved offline from the local Hugging Face cache.", default="")
    revision: str | None = flag("Revision of a hub model id (branch, tag or commit).")
    validation_workers: int = flag("Instances of the tokenizer model (tokenization runs in its "
                                   "own processes; TGI's validation workers).", default=1)
    sharded: bool | None = flag("Shard the model over GPUs (tensor parallelism); \"true\" "
                                "without --num-shard takes every visible GPU.",
                                choices=("true", "false"))
    num_shard: int | None = flag("Shards to split the model over, one process each: GPUs "
                                 "(NCCL), or on the CPU processes (gloo). Default 1.")
    master_addr: str = flag("Address the shards' processes meet at (torch.distributed's "
                            "rendezvous; they all run on this host).", default="127.0.0.1")
    master_port: int | None = flag("Port of that rendezvous. Default: a free port (TGI's "
                                   "default is 29500, which two servers on one host would "
                                   "share).")
    huggingface_hub_cache: str | None = flag("Hugging Face hub cache to resolve --model-id in "
                                             "(default: HF_HUB_CACHE or ~/.cache/huggingface/hub).")
    weights_cache_override: str | None = flag("Directory holding the weight files "
                                              "(*.safetensors) to load instead of the model "
                                              "directory's; config and tokenizer still come "
                                              "from --model-id.")
    load_format: str = flag("How to get the weights: \"safetensors\" from the model directory; "
                            "\"pt\" also allows pickled PyTorch *.bin weights (prefer `textgen "
                            "convert-to-safetensors`); \"dummy\": random weights of the model's "
                            "shape, for benchmarks (vLLM's names).", default="safetensors",
                            choices=LOAD_FORMATS)
    quantize: str | None = flag("Serve a 4-bit (or 8-bit GPTQ) checkpoint: \"gptq\" or \"awq\" "
                                "(its quantization_config must agree; a GPTQ / AWQ checkpoint is "
                                "recognized without the flag too; with --load-format dummy: "
                                "random 4-bit weights, groups of 128). Or quantize a dense "
                                "checkpoint when loading it: \"eetq\" (int8 per channel), "
                                "\"fp8\" (e4m3 weights and activations), \"bitsandbytes\" "
                                "(LLM.int8), \"bitsandbytes-nf4\", \"bitsandbytes-fp4\".",
                                choices=QUANTIZE)
    dtype: str | None = flag("Weights and activations dtype. Default: float32 on the CPU, "
                             "the checkpoint's float16/bfloat16 on a GPU (else bfloat16).",
                             choices=DTYPES)
    trust_remote_code: bool = flag("Allow the tokenizer's own Python code from the model "
                                   "repository (our model implementations never run hub "
                                   "code).", default=False)
    rope_scaling: str | None = flag("Stretch rotary positions beyond the model's window "
                                    "(overrides config.json); with --rope-factor.",
                                    choices=("linear", "dynamic"))
    rope_factor: float | None = flag("Rope scaling factor; alone it means linear scaling. The "
                                     "window grows by this factor.")
    max_concurrent_requests: int = flag("Most prompts in flight (queued or generating); more "
                                        "are rejected with an overload error.", default=128)
    max_stop_sequences: int = flag("Most stop sequences a request may give.", default=4)
    max_best_of: int = flag("Most candidates a request may ask for with best_of.", default=2)
    max_top_n_tokens: int = flag("Most alternatives a request may ask for with top_n_tokens.",
                                 default=5)
    watermark_gamma: float = flag("Share of the vocabulary in a watermark's green list.",
                                  default=0.5)
    watermark_delta: float = flag("Logit bias given to a watermark's green list.", default=2.0)
    max_client_batch_size: int = flag("Most prompts in one request (rows of text_input); the "
                                      "models' max_batch_size.", default=4)
    max_input_tokens: int | None = flag("Longest prompt in tokens. Default: "
                                        "min(max_position_embeddings - 1, 4095).",
                                        aliases=("--max-input-length",),
                                        env_aliases=("MAX_INPUT_LENGTH",))
    max_total_tokens: int | None = flag("Most prompt + generated tokens per request. Default: "
                                        "min(max_position_embeddings, 4096).")
    waiting_served_ratio: float = flag("Admit waiting requests into a running batch once at "
                                       "least this ratio of its size can join (with "
                                       "--no-chunked-prefill).", default=0.3)
    max_batch_prefill_tokens: int | None = flag("Most prompt tokens in one step (with chunked "
                                                "prefill: the chunk budget). Default: "
                                                "max_input_tokens + 50.")
    max_batch_total_tokens: int | None = flag("KV-cache capacity in tokens. Default: sized from "
                                              "free GPU memory; 4 x max_total_tokens on the CPU.")
    max_waiting_tokens: int = flag("Decode steps after which waiting requests join the batch "
                                   "whatever the waiting_served_ratio (with "
                                   "--no-chunked-prefill).", default=20)
    max_batch_size: int | None = flag("Most sequences in a batch (default: no limit).")
    chunked_prefill: bool = flag("Prefill prompts longer than --max-batch-prefill-tokens in "
                                 "chunks over several steps, each step also decoding every "
                                 "running sequence (streams never stall behind a long prompt); "
                                 "--no-chunked-prefill runs TGI's separate prefill steps.",
                                 default=True)
    async_scheduling: bool = flag("Schedule and launch each step while the GPU still runs the "
                                  "one before, so that the host's work per step (scheduling, "
                                  "reading tokens, sending outputs) hides behind the GPU's "
                                  "(vLLM's --async-scheduling); it applies while no running "
                                  "request uses a watermark, bad words of several tokens or a "
                                  "grammar, with one shard, and with --speculate only while "
                                  "more sequences run than --speculation-max-batch-size (steps "
                                  "with drafts need the tokens before them). "
                                  "--no-async-scheduling waits for each step's tokens before "
                                  "scheduling the next.", default=True)
    prefix_caching: bool = flag("Reuse the KV of prompt prefixes that earlier requests computed "
                                "(blocks full of the same tokens, adapter and soft prompt); "
                                "--no-prefix-caching recomputes every prompt.", default=True)
    engine_stall_timeout_s: float = flag("Seconds the engine may go without finishing a step "
                                         "while requests are in flight before it is declared "
                                         "stuck: its process is stopped, the requests fail "
                                         "with that reason and new ones are refused; 0 "
                                         "disables.", default=120.0)
    exit_on_engine_failure: bool = flag("When the engine process dies or the watchdog stops "
                                        "it: fail the requests in flight, then shut "
                                        "tritonserver down (readiness turns false, the process "
                                        "exits) so that an orchestrator restarts it, as TGI "
                                        "exits when a shard dies; --no-exit-on-engine-failure "
                                        "keeps it up, refusing new requests.", default=True)
    block_size: int = flag("Tokens per KV-cache block.", default=16)
    kv_cache_dtype: str = flag("KV cache dtype: \"auto\" (the model's) or \"fp8\" / "
                               "\"fp8_e4m3\" (float8 e4m3: twice the tokens in the same "
                               "memory; with an fp8 checkpoint's per-layer k/v scales, else "
                               "saturating at +-448; the CPU, or a GPU of compute capability "
                               "8.9+) (vLLM's names).", default="auto",
                               choices=KV_CACHE_DTYPES)
    stream_responses_per_second: int = flag(
        "Streamed responses per second shared by all streams: past it, a stream's tokens are "
        "coalesced into fewer, longer deltas (each response has a fixed cost in Triton: at "
        "4000 on an H200 machine the response path fell behind the engine, 1000 kept up).",
        default=1000)
    cuda_memory_fraction: float = flag("Fraction of the GPU's memory the engine may use.",
                                       default=0.9)
    cuda_graphs: str = flag("Decode batch sizes to capture CUDA graphs for (a batch runs in the "
                            "next larger one; with --speculate, those up to "
                            "--speculation-max-batch-size also with its drafts); \"0\" disables.",
                            default="1,2,4,8,16,32,64,128,256")
    prefill_cuda_graphs: str = flag("Prefill token counts to capture CUDA graphs for (at most 8 "
                                    "prompts or chunks, without prompt details, run in the next "
                                    "larger one; with chunked prefill also beside each decode "
                                    "batch size; longer ones run eagerly); \"0\" disables.",
                                    default="16,32,64,128,256,512")
    disable_custom_kernels: bool = flag("Use the pure-torch reference ops instead of our Triton "
                                        "kernels on the GPU (no CUDA graphs then).", default=False)
    adapter_id: str | None = flag("LoRA adapters loaded at start and never evicted, comma-"
                                  "separated (each resolved with --adapter-source).")
    adapter_source: str = flag("Where adapter ids are looked up when a request (or "
                               "--adapter-id) does not say: \"hub\" (the local Hugging Face "
                               "cache, never downloaded) or \"local\" (a directory path or a "
                               "name under --adapter-directory).", default="hub",
                               choices=ADAPTER_SOURCES)
    adapter_directory: str | None = flag("Directory whose subdirectories are local adapters "
                                         "by name.")
    max_active_adapters: int = flag("Most adapters resident at once (each holds a slot of "
                                    "--max-lora-rank); more are loaded as others go idle or "
                                    "yield.", default=1024)
    adapter_cycle_time_s: float = flag("When more adapters wait than fit, every this many "
                                       "seconds the longest-resident one stops admitting new "
                                       "requests so that its slot frees.", default=2.0)
    adapter_memory_fraction: float = flag("Fraction of device memory reserved for adapter "
                                          "slots, taken from the KV cache's budget (host memory "
                                          "on the CPU).", default=0.1)
    max_lora_rank: int = flag("Highest LoRA rank an adapter may have (sizes every slot); "
                              "\"0\" serves the base model only.", default=64)
    disable_grammar_support: bool = flag("Refuse grammar-constrained requests (grammar, "
                                         "guided_decoding_*, vLLM's guided_* and "
                                         "structured_outputs).", default=False)
    prefix_store_path: str | None = flag("Directory of tuned soft prompts (PEFT prompt tuning "
                                         "or TGIS's decoder.pt), chosen per request by "
                                         "prefix_id.")
    prompt_cache_size_mb: int = flag("Megabytes of loaded soft prompts kept on the device "
                                     "(least recently used ones are dropped past it).",
                                     default=512)
    speculate: int | None = flag("Draft tokens verified per decode step (TGI's --speculate): "
                                 "a model directory with Medusa heads "
                                 "(medusa_lm_head.safetensors) drafts with them, any other with "
                                 "n-gram prompt lookup; 0 disables. Default: all of a Medusa "
                                 "model's heads (TGI), else 0.",
                                 default=None, aliases=("--speculative-tokens",),
                                 env_aliases=("SPECULATIVE_TOKENS",))
    speculation_max_batch_size: int = flag("Steps with more decoding sequences than this run "
                                           "without drafts (speculation costs throughput "
                                           "under load).", default=32)
    tokenizer_config_path: str | None = flag("A tokenizer_config.json whose chat_template "
                                             "replaces the model's.")
    json_output: bool = flag("Log as JSON lines (the launcher and the Python models; "
                             "tritonserver's own lines keep Triton's format).", default=False)

    def __post_init__(self):
        positive = ["max_concurrent_requests", "max_client_batch_size",
                    "stream_responses_per_second", "max_input_tokens", "max_total_tokens",
                    "max_batch_prefill_tokens", "max_batch_total_tokens", "max_batch_size",
                    "block_size"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_best_of < 1:
            raise ValueError(f"max_best_of must be >= 1, got {self.max_best_of}")
        if not 0 < self.watermark_gamma < 1:
            raise ValueError(f"watermark_gamma must be in (0, 1), got {self.watermark_gamma}")
        for name in ("max_stop_sequences", "max_waiting_tokens", "max_top_n_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.waiting_served_ratio < 0:
            raise ValueError(f"waiting_served_ratio must be >= 0, got {self.waiting_served_ratio}")
        if not 0 < self.cuda_memory_fraction <= 1:
            raise ValueError(f"cuda_memory_fraction must be in (0, 1], got {self.cuda_memory_fraction}")
        if self.rope_scaling not in (None, "linear", "dynamic"):
            raise ValueError(f"rope_scaling must be linear or dynamic, got {self.rope_scaling!r}")
        if self.rope_factor is not None and self.rope_factor <= 0:
            raise ValueError(f"rope_factor must be > 0, got {self.rope_factor}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got "
                             f"{self.load_format!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
        if self.num_shard is not None and self.num_shard < 1:
            raise ValueError(f"num_shard must be >= 1, got {self.num_shard}")
        if self.sharded is False and (self.num_shard or 1) > 1:
            raise ValueError(f"--sharded false contradicts --num-shard {self.num_shard}")
        if self.sharded and self.num_shard == 1:
            raise ValueError("--sharded true needs --num-shard of 2 or more (or unset: every "
                             "visible GPU)")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} (other methods are "
                             f"not supported), got {self.quantize!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.cuda_graph_batch_sizes, self.prefill_graph_token_counts  # validates the lists
        if self.adapter_source not in ADAPTER_SOURCES:
            raise ValueError(f"adapter_source must be one of {', '.join(ADAPTER_SOURCES)}, got "
                             f"{self.adapter_source!r}")
        if self.max_active_adapters < 1:
            raise ValueError(f"max_active_adapters must be >= 1, got {self.max_active_adapters}")
        if self.prompt_cache_size_mb < 0:
            raise ValueError(f"prompt_cache_size_mb must be >= 0, got {self.prompt_cache_size_mb}")
        if self.speculate is not None and not 0 <= self.speculate <= MAX_SPECULATE:
            raise ValueError(f"speculate must be in [0, {MAX_SPECULATE}], got {self.speculate}")
        if self.engine_stall_timeout_s < 0:
            raise ValueError(f"engine_stall_timeout_s must be >= 0, got "
                             f"{self.engine_stall_timeout_s}")
        if self.speculation_max_batch_size < 1:
            raise ValueError(f"speculation_max_batch_size must be >= 1, got "
                             f"{self.speculation_max_batch_size}")
        if self.max_lora_rank < 0:
            raise ValueError(f"max_lora_rank must be >= 0, got {self.max_lora_rank}")
        if self.adapter_cycle_time_s <= 0:
            raise ValueError(f"adapter_cycle_time_s must be > 0, got {self.adapter_cycle_time_s}")
        if not 0 < self.adapter_memory_fraction < 1:
            raise ValueError(f"adapter_memory_fraction must be in (0, 1), got "
                             f"{self.adapter_memory_fraction}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_input_tokens and self.max_total_tokens:
            if self.max_input_tokens >= self.max_total_tokens:
                raise ValueError(f"max_input_tokens ({self.max_input_tokens}) must be < "
                                 f"max_total_tokens ({self.max_total_tokens})")

    @property
    def preloaded_adapters(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in (self.adapter_id or "").split(",") if a.strip())

    @property
    def cuda_graph_batch_sizes(self) -> tuple[int, ...]:
        return _positive_list("cuda_graphs", self.cuda_graphs)

    @property
    def prefill_graph_token_counts(self) -> tuple[int, ...]:
        return _positive_list("prefill_cuda_graphs", self.prefill_cuda_graphs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineConfig:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class EngineLimits:
    """Limits resolved from the config, the model and the device."""
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    num_kv_blocks: int
    block_size: int
    max_batch_size: int | None
    max_waiting_tokens: int
    waiting_served_ratio: float
    chunked_prefill: bool = False
    grammar_support: bool = False     # the engine could build grammar matchers

    @property
    def max_batch_total_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


def resolve_token_limits(config: EngineConfig, max_position_embeddings: int) -> tuple[int, int, int]:
    """(max_input_tokens, max_total_tokens, max_batch_prefill_tokens) with TGI's defaults."""
    max_total = config.max_total_tokens or min(max_position_embeddings, 4096)
    max_input = config.max_input_tokens or min(max_position_embeddings - 1, 4095, max_total - 1)
    if max_input >= max_total:
        raise ValueError(f"max_input_tokens ({max_input}) must be < max_total_tokens ({max_total})")
    if max_total > max_position_embeddings:
        raise ValueError(f"max_total_tokens ({max_total}) exceeds the model's "
                         f"max_position_embeddings ({max_position_embeddings})")
    prefill = config.max_batch_prefill_tokens or max_input + 50
    if prefill < max_input and not config.chunked_prefill:
        raise ValueError(f"max_batch_prefill_tokens ({prefill}) must be >= max_input_tokens "
                         f"({max_input}) without chunked prefill")
    if config.max_batch_total_tokens is not None and config.max_batch_total_tokens < max_total:
        raise ValueError(f"max_batch_total_tokens ({config.max_batch_total_tokens}) must be >= "
                         f"max_total_tokens ({max_total})")
    return max_input, max_total, prefill


# --- command-line flags generated from dataclass fields -------------------------------------

def _flag_type(annotation: str):
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float, "str": str, "bool": bool}[base]


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Adds one `--field-name` option (and its aliases) per field of `cls`, defaulting to env
    FIELD_NAME or an env alias. A `bool` field is a switch (one on by default also gets
    `--no-field-name`); a `bool | None` one takes true/false (TGI's `--sharded <true|false>`)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        option = "--" + f.name.replace("_", "-")
        env_names = (f.name.upper(),) + tuple(meta.get("env_aliases", ()))
        kind = _flag_type(f.type)
        choices = meta.get("choices")
        default = f.default
        for env_name in env_names:
            if env_name in os.environ:
                default = _parse_env(env_name, os.environ[env_name], kind, option, choices)
                break
        aliases = meta.get("aliases", ())
        names = [a for a in aliases if not a.startswith("--")] + [option] + [
            a for a in aliases if a.startswith("--")]
        if f.type == "bool":
            # on by default: --name and --no-name (TGI's --prefix-caching / LoRAX's --no-...)
            switch = argparse.BooleanOptionalAction if f.default else "store_true"
            action = parser.add_argument(*names, dest=f.name, action=switch,
                                         default=default, help=meta.get("help", ""))
        else:
            action = parser.add_argument(
                *names, dest=f.name, type=_parse_bool if kind is bool else kind, default=default,
                choices=None if kind is bool else choices, help=meta.get("help", ""),
                metavar=f"<{f.name.upper()}>")
        # Read by FlagHelpFormatter.
        action.env_names, action.field_default, action.possible_values = (
            env_names, f.default, choices)


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 'true', "
                                         f"'false')")
    return text.lower() == "true"


def _parse_env(name: str, value: str, kind, option: str, choices):
    if kind is bool and choices is None:   # a switch
        return value.lower() in ("1", "true", "yes", "on")
    try:
        parsed = _parse_bool(value) if kind is bool else kind(value)
    except (ValueError, argparse.ArgumentTypeError):
        expected = "true or false" if kind is bool else f"a valid {kind.__name__}"
        raise SystemExit(f"{option}: environment variable {name}={value!r} is not "
                         f"{expected}") from None
    if choices is not None and kind is not bool and parsed not in choices:
        raise SystemExit(f"{option}: environment variable {name}={value!r} is not one of "
                         f"{', '.join(choices)}")
    return parsed


class FlagHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help laid out like TGI's launcher (clap's long help): each option on its own line, its
    help below it, then its env vars, default and possible values."""

    def __init__(self, prog):
        super().__init__(prog, width=100)

    def add_usage(self, usage, actions, groups, prefix=None):
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)

    def start_section(self, heading):
        super().start_section("Options" if heading == "options" else heading)

    def _format_action(self, action):
        names = ", ".join(action.option_strings)
        indent = "  " if not action.option_strings[0].startswith("--") else "      "
        value = f" {action.metavar}" if action.nargs != 0 and action.metavar else ""
        lines = [indent + names + value]
        lines += textwrap.wrap(action.help or "", self._width - 10, initial_indent=" " * 10,
                               subsequent_indent=" " * 10)
        notes = [f"[env: {name}=]" for name in getattr(action, "env_names", ())]
        default = getattr(action, "field_default", None)
        if default not in (None, "", False):
            notes.append(f"[default: {default}]")
        if getattr(action, "possible_values", None):
            notes.append(f"[possible values: {', '.join(action.possible_values)}]")
        if notes:
            lines += [""] + [" " * 10 + note for note in notes]
        return "\n".join(lines) + "\n\n"


def from_flags(cls, namespace: argparse.Namespace):
    """Builds `cls` from the parsed options of `add_flags`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})

