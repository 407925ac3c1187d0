"""Hands out fixed-size KV-cache blocks to sequences.

A sequence holding n tokens in the cache owns ceil(n / block_size) blocks, listed in order in
its block table. Blocks are exclusive for now; prefix caching will add hashes and ref counts.
"""
from __future__ import annotations

from collections import deque

from textgen_backend.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's tokens (its prefill)."""
        assert not seq.block_ids, f"sequence {seq.seq_id} already holds blocks"
        needed = self.blocks_for(seq.num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"cannot allocate {needed} blocks, {len(self._free)} free")
        seq.block_ids = [self._free.popleft() for _ in range(needed)]

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= len(seq.block_ids) or bool(self._free)

    def append_slot(self, seq: Sequence) -> None:
        """Makes room for seq's newest token (a decode step writes it at num_tokens - 1)."""
        if self.blocks_for(seq.num_tokens) > len(seq.block_ids):
            seq.block_ids.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_ids)
        seq.block_ids = []
