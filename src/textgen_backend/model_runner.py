"""Runs one scheduled step on the model: builds the step's tensors, runs the forward pass over
the paged KV cache, samples. The only host sync is reading the sampled tokens."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from textgen_backend.layers.attention import AttentionMetadata
from textgen_backend.model_config import ModelConfig
from textgen_backend.sampling import build_sampling_batch, sample
from textgen_backend.scheduler import SchedulerOutput
from textgen_backend.sequence import Sequence

logger = logging.getLogger("textgen")


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype, block_size: int, eos_token_ids: tuple[int, ...]):
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        return per_token * self.block_size

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_config
        shape = (num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = []
        for attn in self.model.attention_layers():
            attn.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append((attn.k_cache, attn.v_cache))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int]:
        input_ids, positions, meta, last_token_rows = self._prepare(out.seqs, out.is_prefill)
        sampling = build_sampling_batch(out.seqs, self.eos_token_ids,
                                        self.model_config.vocab_size, self.device)
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[last_token_rows])
        return sample(logits, sampling).tolist()

    def _prepare(self, seqs: list[Sequence], is_prefill: bool):
        bs = self.block_size
        if is_prefill:
            lengths = [s.num_tokens for s in seqs]
            token_ids = [t for s in seqs for t in s.all_ids]
            positions = np.concatenate([np.arange(n) for n in lengths])
            slots = np.concatenate([self._slots(s.block_ids, n) for s, n in zip(seqs, lengths)])
        else:
            lengths = [s.num_tokens for s in seqs]
            token_ids = [s.last_token for s in seqs]
            positions = np.array(lengths) - 1
            slots = np.array([s.block_ids[(n - 1) // bs] * bs + (n - 1) % bs
                              for s, n in zip(seqs, lengths)])
        q_lens = lengths if is_prefill else [1] * len(seqs)
        cu_seqlens = np.concatenate([[0], np.cumsum(q_lens)])
        width = max(len(s.block_ids) for s in seqs)
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for row, s in enumerate(seqs):
            tables[row, :len(s.block_ids)] = s.block_ids

        def dev(array, dtype):
            return torch.from_numpy(np.asarray(array)).to(self.device, dtype, non_blocking=True)

        meta = AttentionMetadata(
            is_decode=not is_prefill,
            slot_mapping=dev(slots, torch.int64),
            context_lens=dev(lengths, torch.int32),
            block_tables=dev(tables, torch.int32),
            cu_seqlens_q=dev(cu_seqlens, torch.int32),
            max_seqlen_q=max(q_lens),
        )
        last_token_rows = dev(cu_seqlens[1:] - 1, torch.int64)
        return dev(token_ids, torch.int64), dev(positions, torch.int64), meta, last_token_rows

    def _slots(self, block_ids: list[int], num_tokens: int) -> np.ndarray:
        bs = self.block_size
        return (np.asarray(block_ids)[:, None] * bs + np.arange(bs)).reshape(-1)[:num_tokens]
