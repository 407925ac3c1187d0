"""Llama (and the families that only tweak it: Mistral, Qwen2) over the paged KV cache.

Q/K/V and gate/up projections are fused at load time; every layer sees the step's tokens
packed into one [num_tokens, hidden] tensor, whatever the number of sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from textgen_backend.layers.attention import AttentionMetadata, PagedAttention
from textgen_backend.layers.ops import Ops
from textgen_backend.layers.quantized_linear import QuantizedWeightLoader, make_linear
from textgen_backend.layers.rmsnorm import RMSNorm
from textgen_backend.layers.rotary import RotaryEmbedding
from textgen_backend.layers.vocab_parallel import VocabParallelEmbedding
from textgen_backend.models.config import ModelConfig
from textgen_backend.weights.quantization import QuantConfig

if TYPE_CHECKING:
    from textgen_backend.parallel.group import TensorParallel


@dataclass(frozen=True)
class ProjectionTarget:
    """Where a checkpoint projection (q_proj, or an already fused qkv_proj) lives in our model:
    module (under a layer), its output rows [offset, offset + size), which of the module's
    fused shards it is, and the module's input width."""
    module: str
    offset: int
    size: int
    shard: int
    in_features: int


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, qkv_bias: bool, o_bias: bool,
                 sliding_window: int | None, quant: QuantConfig | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = make_linear(config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias,
                                    ops, quant)
        self.o_proj = make_linear(self.q_size, config.hidden_size, o_bias, ops, quant)
        self.rotary = RotaryEmbedding(ops, self.head_dim, config.max_position_embeddings,
                                      config.rope_theta, config.rope_scaling)
        self.attn = PagedAttention(ops, self.num_heads, self.num_kv_heads, self.head_dim,
                                   sliding_window)

    def forward(self, positions, hidden, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.o_proj(self.attn(q, k, v.contiguous(), meta).reshape(-1, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)  # row-parallel o_proj


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, quant: QuantConfig | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.ops = ops
        self.tp = tp
        self.gate_up_proj = make_linear(config.hidden_size, 2 * config.intermediate_size, False,
                                        ops, quant)
        self.down_proj = make_linear(config.intermediate_size, config.hidden_size, False, ops,
                                     quant)

    def forward(self, hidden):
        out = self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(hidden)))
        return out if self.tp is None else self.tp.all_reduce(out)  # row-parallel down_proj


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, qkv_bias: bool, o_bias: bool,
                 sliding_window: int | None, quant: QuantConfig | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, ops, qkv_bias, o_bias, sliding_window, quant,
                                        tp)
        self.post_attention_layernorm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, ops, quant, tp)

    def forward(self, positions, hidden, residual, meta):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    # Checkpoint names fused into one of our parameters: (ours, theirs, shard index).
    stacked_params = (
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )
    qkv_bias = False

    def __init__(self, config: ModelConfig, ops: Ops, quant: QuantConfig | None = None,
                 tp: TensorParallel | None = None):
        """quant: GPTQ / AWQ projections (embeddings, norms and lm_head stay dense).
        tp: this rank's collectives when sharded; config then has its share of the heads and
        MLP columns (parallel/layout.py), and the vocabulary is split here."""
        super().__init__()
        self.config = config
        self.quant = quant
        self.tp = tp
        qkv_bias = self.qkv_bias or config.attention_bias
        o_bias = config.attention_bias
        if tp is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, ops, qkv_bias, o_bias, config.sliding_window, quant, tp)
            for _ in range(config.num_layers))
        self.norm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, self.embed_tokens.weight.shape[0],
                                 bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def projection_targets(cls, config: ModelConfig) -> dict[str, ProjectionTarget]:
        """Checkpoint projection names (a layer's leaf names) -> where they live in our model;
        what adapters and quantized checkpoints are mapped through."""
        h, inter = config.hidden_size, config.intermediate_size
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        fused = {"self_attn.qkv_proj": ([q, kv, kv], h), "mlp.gate_up_proj": ([inter, inter], h)}
        targets = {"o_proj": ProjectionTarget("self_attn.o_proj", 0, h, 0, q),
                   "down_proj": ProjectionTarget("mlp.down_proj", 0, h, 0, inter)}
        for module, (sizes, width) in fused.items():
            leaf = module.rsplit(".", 1)[1]
            targets[leaf] = ProjectionTarget(module, 0, sum(sizes), 0, width)
        for ours, theirs, shard in cls.stacked_params:
            module = next(m for m in fused if m.endswith(ours))
            sizes, width = fused[module]
            targets[theirs] = ProjectionTarget(module, sum(sizes[:shard]), sizes[shard], shard,
                                               width)
        return targets

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata,
                embeddings_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden].
        embeddings_at: (token rows, their input embeddings) replacing the token embeddings
        there (soft prompts' virtual tokens)."""
        hidden, residual = self.embed_tokens(input_ids), None
        if embeddings_at is not None:
            rows, vectors = embeddings_at
            hidden = hidden.index_copy(0, rows, vectors)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.tp is not None:  # each rank's part of the vocabulary, padding at the end
            logits = self.tp.all_gather(logits)[:, :self.config.vocab_size]
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (HF names) into our parameters, fusing stacked ones."""
        params = dict(self.named_parameters())
        loaded = set()
        quantized = (QuantizedWeightLoader(self, self.quant, self._quantized_target)
                     if self.quant is not None else None)
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if quantized is not None and quantized.accepts(name):
                quantized.add(name, tensor)
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for ours, theirs, shard in self.stacked_params:
                if f".{theirs}." in name:
                    name = name.replace(theirs, ours)
                    self._copy_shard(params[name], tensor, ours, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no parameter in "
                                     f"{type(self).__name__}")
                if params[name].shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].data.copy_(tensor)
            loaded.add(name)
        if quantized is not None:
            quantized.finish(self._checkpoint_layers_in)
        missing = set(params) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks tensors for {sorted(missing)[:5]} "
                             f"({len(missing)} missing)")

    def _checkpoint_layers_in(self, module: str) -> int:
        """How many checkpoint layers our module fuses (qkv_proj: 3, gate_up_proj: 2, else 1)."""
        fused = module.rsplit(".", 1)[-1]
        return sum(ours == fused for ours, _, _ in self.stacked_params) or 1

    def _quantized_target(self, layer: str) -> tuple[str, int, int]:
        """A checkpoint layer ("layers.0.self_attn.k_proj") -> (our module, column offset,
        columns): its shard of a fused projection, or the whole of an unfused one."""
        prefix, _, leaf = layer.rpartition(".")
        target = self.projection_targets(self.config).get(leaf)
        if target is None or not layer.startswith("layers."):
            raise ValueError(f"checkpoint layer {layer!r} has no module in "
                             f"{type(self).__name__}")
        return f"{prefix}.{target.module.rsplit('.', 1)[1]}", target.offset, target.size

    def _copy_shard(self, param: nn.Parameter, tensor: torch.Tensor, fused: str, shard: int):
        theirs = next(name for ours, name, index in self.stacked_params
                      if ours == fused and index == shard)
        target = self.projection_targets(self.config)[theirs]
        if tensor.shape[0] != target.size:
            raise ValueError(f"{fused} shard {shard} has {tensor.shape[0]} rows, expected "
                             f"{target.size}")
        param.data[target.offset:target.offset + target.size].copy_(tensor)
