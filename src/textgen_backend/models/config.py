"""The parts of a Hugging Face config.json (and generation_config.json) the engine needs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None

    def with_rope_override(self, scaling: str | None, factor: float | None) -> ModelConfig:
        """TGI's --rope-scaling / --rope-factor: replace config.json's scaling, widen the window."""
        if scaling is None and factor is None:
            return self
        factor = 1.0 if factor is None else factor
        rope = {"rope_type": scaling or "linear", "factor": factor}
        if rope["rope_type"] == "dynamic":
            rope["original_max_position_embeddings"] = self.max_position_embeddings
        return dataclasses.replace(self, rope_scaling=rope, max_position_embeddings=int(
            self.max_position_embeddings * factor))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        model_dir = Path(model_dir)
        raw = json.loads((model_dir / "config.json").read_text())
        generation = {}
        if (model_dir / "generation_config.json").exists():
            generation = json.loads((model_dir / "generation_config.json").read_text())
        return cls.from_dict(raw, generation)

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None) -> ModelConfig:
        architectures = raw.get("architectures") or []
        if len(architectures) != 1:
            raise ValueError(f"config.json must name exactly one architecture, got {architectures}")
        architecture = architectures[0]
        num_heads = raw["num_attention_heads"]
        # transformers 5 moved rope_theta / rope_scaling into rope_parameters.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = raw.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "dynamic":
            rope["original_max_position_embeddings"] = raw.get("max_position_embeddings")  # as HF
        eos = (generation or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        sliding_window = raw.get("sliding_window")
        if architecture == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding_window = None
        return cls(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            sliding_window=sliding_window,
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
