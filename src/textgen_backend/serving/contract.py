"""The request/response contract, written once: Triton tensor specs for every model of the
ensemble (rendered into config.pbtxt by build.py, read by the model.py files and the client)
and the response dataclass the engine produces.

Public names follow the TensorRT-LLM ensemble convention; tensors internal to the ensemble
start with `_`. Every public tensor has a batch dimension ([B, 1] on the wire for dims [1]).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NUMPY = {"TYPE_STRING": np.object_, "TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32,
          "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # Triton config type, e.g. "TYPE_INT32"
    dims: tuple[int, ...]
    optional: bool = True
    doc: str = ""

    @property
    def numpy_dtype(self):
        return _NUMPY[self.dtype]

    @property
    def wire_dtype(self) -> str:
        """The dtype name tritonclient uses (InferInput's datatype)."""
        return {"TYPE_STRING": "BYTES", "TYPE_FP32": "FP32"}.get(self.dtype, self.dtype[5:])

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        optional = " optional: true" if self.optional else ""
        return f'{{ name: "{self.name}" data_type: {self.dtype} dims: [ {dims} ]{optional} }}'


def _spec(name, dtype, dims=(1,), optional=True, doc=""):
    return TensorSpec(name, dtype, tuple(dims), optional, doc)


# --- public inputs of the ensemble ------------------------------------------------------------
# Optional in the ensemble's config although every request needs it: Triton only counts a
# request's inputs, and a required ensemble input that is missing leaves the tokenizer step
# unscheduled (an empty response, no error). Optional, the tokenizer step runs and the request
# is refused naming text_input (by Triton when the step gets no input, else by the tokenizer).
TEXT_INPUT = _spec("text_input", "TYPE_STRING",
                   doc="Prompt text; B rows = B prompts sharing the other parameters.")
APPLY_CHAT_TEMPLATE = _spec("apply_chat_template", "TYPE_BOOL",
                            doc="text_input is a JSON list of {role, content} messages, rendered "
                                "with the model's chat template (default false).")
GENERATION_PARAMETERS = (
    _spec("max_tokens", "TYPE_INT32", doc="Most tokens to generate (default 20)."),
    _spec("max_tokens_to_context", "TYPE_BOOL",
          doc="Without max_tokens: generate up to max_total_tokens minus the input tokens "
              "instead of 20 (OpenAI's default; the REST front end's chat sends it)."),
    _spec("stream", "TYPE_BOOL", doc="Stream text deltas (default false)."),
    _spec("temperature", "TYPE_FP32", doc=">= 0; 0 means greedy."),
    _spec("top_k", "TYPE_INT32", doc=">= 0; 0 disables."),
    _spec("top_p", "TYPE_FP32", doc="In (0, 1]."),
    _spec("typical_p", "TYPE_FP32", doc="In (0, 1]; 1 disables (typical sampling)."),
    _spec("min_p", "TYPE_FP32", doc="In [0, 1]; 0 disables."),
    _spec("repetition_penalty", "TYPE_FP32", doc="> 0; 1 disables (HF semantics)."),
    _spec("presence_penalty", "TYPE_FP32", doc="In [-2, 2] (OpenAI semantics)."),
    _spec("frequency_penalty", "TYPE_FP32", doc="In [-2, 2] (OpenAI semantics)."),
    _spec("length_penalty_start_index", "TYPE_INT32",
          doc="TGIS length penalty: EOS is boosted once this many tokens are generated."),
    _spec("length_penalty_decay_factor", "TYPE_FP32", doc="In [1, 10]: the boost's base."),
    _spec("seed", "TYPE_UINT64", doc="Seed for reproducible sampling."),
    _spec("stop_words", "TYPE_STRING", dims=(-1,), doc="Stop sequences, matched on text."),
    _spec("include_stop_sequence", "TYPE_BOOL", doc="Keep a matched stop sequence (default true)."),
    _spec("bad_words", "TYPE_STRING", dims=(-1,), doc="Words whose tokens are never generated."),
    _spec("min_tokens", "TYPE_INT32", doc="EOS and stop sequences are ignored before this many."),
    _spec("min_length", "TYPE_INT32", doc="Alias of min_tokens (TensorRT-LLM, genai-perf)."),
    _spec("time_limit_ms", "TYPE_INT32", doc="Stop after this long (finish_reason time_limit)."),
    _spec("exclude_input_in_output", "TYPE_BOOL", doc="Default true; false prepends the prompt."),
    _spec("ignore_eos", "TYPE_BOOL", doc="Keep generating past EOS (benchmarks)."),
    _spec("best_of", "TYPE_INT32", doc="Candidates per prompt (<= --max-best-of); not streamed."),
    _spec("num_return_sequences", "TYPE_INT32", doc="Best candidates returned (<= best_of)."),
    _spec("watermark", "TYPE_BOOL", doc="Watermark the output (TGI / Kirchenbauer et al.)."),
    _spec("return_log_probs", "TYPE_BOOL",
          doc="Fill cum_log_probs, output_log_probs and token_details (logprob, rank)."),
    _spec("top_n_tokens", "TYPE_INT32", doc="Alternatives per token in token_details."),
    _spec("decoder_input_details", "TYPE_BOOL", doc="Fill input_token_details for the prompt."),
    _spec("grammar", "TYPE_STRING",
          doc="TGI's constraint: JSON {\"type\": json | json_schema | regex | grammar, "
              "\"value\": schema, regex or Lark grammar}."),
    _spec("guided_decoding_guide_type", "TYPE_STRING",
          doc="TensorRT-LLM's constraint type: json, json_schema, regex or ebnf_grammar."),
    _spec("guided_decoding_guide", "TYPE_STRING",
          doc="TensorRT-LLM's constraint: the schema, regex or grammar text."),
    _spec("prefix_id", "TYPE_STRING",
          doc="Tuned soft prompt (TGIS prompt tuning) from --prefix-store-path (\"\" = none)."),
    _spec("adapter_id", "TYPE_STRING",
          doc="LoRA adapter for this prompt (\"\" = the base model); lora_name in "
              "sampling_parameters."),
    _spec("adapter_source", "TYPE_STRING",
          doc="Where adapter_id is looked up: \"hub\" or \"local\" (default --adapter-source)."),
    _spec("adapter_parameters", "TYPE_STRING",
          doc="LoRAX's merge of several adapters: JSON {adapter_ids, weights, merge_strategy, "
              "density, majority_sign_method, seed}."),
    _spec("sampling_parameters", "TYPE_STRING",
          doc="vLLM-backend convention: the parameters above as one JSON object."),
)
TRUNCATE_INPUT_TOKENS = _spec("truncate_input_tokens", "TYPE_INT32",
                              doc="Keep only the last N prompt tokens (0: keep all).")

# --- public outputs of the ensemble -----------------------------------------------------------
TEXT_OUTPUT = _spec("text_output", "TYPE_STRING", dims=(-1,), optional=False,
                    doc="Generated text (a delta when streaming).")
OUTPUT_IDS = _spec("output_ids", "TYPE_INT32", dims=(-1,), optional=False,
                   doc="Token ids of this response's text.")
FINISH_REASON = _spec("finish_reason", "TYPE_STRING", optional=False,
                      doc='"length", "eos_token", "stop" or "cancelled" on a prompt\'s last '
                          'response, "" before.')
NUM_INPUT_TOKENS = _spec("num_input_tokens", "TYPE_INT32", optional=False)
NUM_CACHED_TOKENS = _spec("num_cached_tokens", "TYPE_INT32", optional=False,
                          doc="Prompt tokens whose KV came from the prefix cache (at the "
                              "sequence's first admission).")
NUM_OUTPUT_TOKENS = _spec("num_output_tokens", "TYPE_INT32", optional=False,
                          doc="Tokens generated so far for this prompt.")
BATCH_INDEX = _spec("batch_index", "TYPE_INT32", optional=False,
                    doc="Row of text_input this response belongs to.")
SEQUENCE_INDEX = _spec("sequence_index", "TYPE_INT32", optional=False,
                      doc="Which of num_return_sequences (0 = the best).")
STOP_REASON = _spec("stop_reason", "TYPE_STRING", optional=False,
                    doc="TGIS stop reason on a prompt's last response: max_tokens, eos_token, "
                        "stop_sequence, time_limit, cancelled; \"\" before.")
STOP_SEQUENCE = _spec("stop_sequence", "TYPE_STRING", optional=False,
                      doc="The stop sequence that matched, else \"\".")
# Not "seed": an ensemble cannot have an input and an output of the same name.
SEED_USED = _spec("seed_used", "TYPE_UINT64", optional=False,
                  doc="The seed sampling used (the request's, or drawn when not given).")
CUM_LOG_PROBS = _spec("cum_log_probs", "TYPE_FP32", dims=(-1,), optional=False,
                      doc="With return_log_probs: the generated tokens' summed logprob so far.")
OUTPUT_LOG_PROBS = _spec("output_log_probs", "TYPE_FP32", dims=(-1,), optional=False,
                         doc="With return_log_probs: each of this response's tokens' logprob.")
TOKEN_DETAILS = _spec("token_details", "TYPE_STRING", dims=(-1,), optional=False,
                      doc="With return_log_probs or top_n_tokens: one JSON object per token.")
INPUT_TOKEN_DETAILS = _spec("input_token_details", "TYPE_STRING", dims=(-1,), optional=False,
                            doc="With decoder_input_details, on the first response: one JSON "
                                "object per prompt token.")
ENSEMBLE_OUTPUTS = (TEXT_OUTPUT, OUTPUT_IDS, FINISH_REASON, NUM_INPUT_TOKENS, NUM_CACHED_TOKENS,
                    NUM_OUTPUT_TOKENS,
                    BATCH_INDEX, SEQUENCE_INDEX, STOP_REASON, STOP_SEQUENCE, SEED_USED, CUM_LOG_PROBS,
                    OUTPUT_LOG_PROBS, TOKEN_DETAILS, INPUT_TOKEN_DETAILS)
ENSEMBLE_INPUTS = (TEXT_INPUT, APPLY_CHAT_TEMPLATE, TRUNCATE_INPUT_TOKENS) + GENERATION_PARAMETERS

# --- internal tensors -------------------------------------------------------------------------
INPUT_IDS = _spec("_input_ids", "TYPE_INT32", dims=(-1,), doc="Prompt ids, padded per batch.")
INPUT_LENGTHS = _spec("_input_lengths", "TYPE_INT32", doc="Prompt length of each row.")
PROMPT_TEXT = _spec("_prompt_text", "TYPE_STRING", doc="The text that was tokenized.")
CANCEL_ID = _spec("_cancel_id", "TYPE_UINT64",
                  doc="Sent by the detokenizer alone: cancel the request owning this sequence.")
SEQUENCE_ID = _spec("_sequence_id", "TYPE_UINT64", optional=False)

# The tokenizer model is also TGIS's Tokenize API when called on its own.
RETURN_TOKENS = _spec("return_tokens", "TYPE_BOOL", doc="Fill tokens.")
RETURN_OFFSETS = _spec("return_offsets", "TYPE_BOOL", doc="Fill offsets.")
TOKENIZER_ENSEMBLE_INPUTS = (_spec("text_input", "TYPE_STRING", optional=False),
                             APPLY_CHAT_TEMPLATE, TRUNCATE_INPUT_TOKENS)
TOKENIZER_INPUTS = TOKENIZER_ENSEMBLE_INPUTS + (RETURN_TOKENS, RETURN_OFFSETS)
TOKENIZER_OUTPUTS = (_spec("_input_ids", "TYPE_INT32", dims=(-1,), optional=False),
                     _spec("_input_lengths", "TYPE_INT32", optional=False),
                     _spec("_prompt_text", "TYPE_STRING", optional=False))
TOKENIZE_API_OUTPUTS = (
    _spec("token_count", "TYPE_INT32", optional=False, doc="Tokens in the (truncated) input."),
    _spec("input_ids", "TYPE_INT32", dims=(-1,), optional=False, doc="Padded with 0."),
    _spec("tokens", "TYPE_STRING", dims=(-1,), optional=False,
          doc="With return_tokens: each token's string, padded with \"\"."),
    _spec("offsets", "TYPE_INT32", dims=(-1, 2), optional=False,
          doc="With return_offsets: [start, end) characters of each token, padded with -1."),
)
# Generator inputs are all optional so that a bare `_cancel_id` request is valid.
GENERATOR_INPUTS = (INPUT_IDS, INPUT_LENGTHS, PROMPT_TEXT, CANCEL_ID) + GENERATION_PARAMETERS
# The generator's outputs are the public ones, prefixed, plus the sequence id for the relay.
GENERATOR_OUTPUTS = tuple(_spec("_" + s.name, s.dtype, s.dims, optional=False)
                          for s in ENSEMBLE_OUTPUTS) + (SEQUENCE_ID,)
DETOKENIZER_INPUTS = GENERATOR_OUTPUTS
DETOKENIZER_OUTPUTS = ENSEMBLE_OUTPUTS


@dataclass
class GenerationResponse:
    """One response for one returned sequence of a request (a streamed delta or the whole)."""
    text: str
    output_ids: list[int]
    finish_reason: str       # "" until the sequence's last response
    num_input_tokens: int
    num_output_tokens: int
    batch_index: int
    sequence_id: int
    seed: int = 0
    num_cached_tokens: int = 0
    sequence_index: int = 0
    stop_reason: str = ""
    stop_sequence: str = ""
    cum_log_prob: float | None = None          # with return_log_probs
    output_log_probs: list[float] = field(default_factory=list)
    token_details: list[str] = field(default_factory=list)        # JSON objects
    input_token_details: list[str] = field(default_factory=list)  # JSON objects

    def tensors(self) -> dict[str, np.ndarray]:
        """Generator output tensors, [1, ...] each (a batch of one)."""
        def strings(values):
            return np.array([[v.encode() for v in values]], dtype=np.object_).reshape(1, -1)

        return {
            "_text_output": strings([self.text]),
            "_output_ids": np.array([self.output_ids], dtype=np.int32).reshape(1, -1),
            "_finish_reason": strings([self.finish_reason]),
            "_num_input_tokens": np.array([[self.num_input_tokens]], dtype=np.int32),
            "_num_cached_tokens": np.array([[self.num_cached_tokens]], dtype=np.int32),
            "_num_output_tokens": np.array([[self.num_output_tokens]], dtype=np.int32),
            "_batch_index": np.array([[self.batch_index]], dtype=np.int32),
            "_sequence_index": np.array([[self.sequence_index]], dtype=np.int32),
            "_stop_reason": strings([self.stop_reason]),
            "_stop_sequence": strings([self.stop_sequence]),
            "_seed_used": np.array([[self.seed]], dtype=np.uint64),
            "_cum_log_probs": np.array([[] if self.cum_log_prob is None else [self.cum_log_prob]],
                                       dtype=np.float32).reshape(1, -1),
            "_output_log_probs": np.array([self.output_log_probs], dtype=np.float32).reshape(1, -1),
            "_token_details": strings(self.token_details),
            "_input_token_details": strings(self.input_token_details),
            "_sequence_id": np.array([[self.sequence_id]], dtype=np.uint64),
        }
