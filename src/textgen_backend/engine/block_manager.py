"""Hands out fixed-size KV-cache blocks to sequences, and keeps full ones for reuse (prefix
caching).

A sequence holding n tokens in the cache owns ceil(n / block_size) blocks, listed in order in
its block table. A block full of computed tokens is identified by a hash chain: its parent's
hash, its token ids, and what else changes its KV (the LoRA adapter, the soft prompt). Blocks
are reference-counted: a new sequence whose first blocks hash like cached ones shares them and
computes only the rest. A block nobody holds stays cached on the free list and is reused least
recently freed first (a chain's tail before its head); only then is its hash forgotten. A
running sequence never loses a block it holds.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from textgen_backend.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int], extra: str) -> bytes:
    """A full block's identity: collisions would silently share wrong KV, so a real digest."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    digest.update(extra.encode())
    return digest.digest()


def _extra_key(seq: Sequence) -> str:
    """What besides the tokens shapes a sequence's KV."""
    adapter = seq.adapter.key if seq.adapter else ""
    prefix = seq.prefix.key if seq.prefix else ""
    return f"{adapter}\0{prefix}"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}                    # hash -> block
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.query_tokens = 0   # prompt tokens looked up in the cache, since start
        self.hit_tokens = 0     # of which found there
        self.evictions = 0      # cached blocks whose hash was dropped to reuse them

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of seq's tokens; at least one token is left
        to compute (its logits are needed). None for a prefill that wants every position's
        details (prompt logprobs)."""
        if not self.caching or (seq.details.input_details and not seq.input_details_done):
            return []
        hits = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def blocks_needed(self, seq: Sequence, hits: list[int], extra_tokens: int = 0) -> int:
        """Free-list blocks that admitting seq takes (a cached block nobody holds leaves the
        free list too)."""
        shared = sum(self._refs[b] > 0 for b in hits)
        return self.blocks_for(seq.num_tokens + extra_tokens) - shared

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's tokens (its prefill): the cached prefix shared, the rest
        new; seq.num_computed_tokens says how many need no computing."""
        assert not seq.block_ids, f"sequence {seq.seq_id} already holds blocks"
        hits = self.cached_prefix(seq)
        if self.blocks_needed(seq, hits) > len(self._free):
            raise RuntimeError(f"cannot allocate {self.blocks_needed(seq, hits)} blocks, "
                               f"{len(self._free)} free")
        for block in hits:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        seq.block_ids = hits + [self._take_free()
                                for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.scheduled_at is None:  # the request's hit: readmitted after a preemption, a
            seq.num_cached_tokens = seq.num_computed_tokens  # sequence finds its own blocks
        seq.num_registered_blocks = len(hits)
        if self.caching:
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_computed_tokens

    def can_append(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= len(seq.block_ids) or bool(self._free)

    def append_slot(self, seq: Sequence) -> None:
        """Makes room for seq's newest token (a decode step writes it at num_tokens - 1)."""
        if self.blocks_for(seq.num_tokens) > len(seq.block_ids):
            seq.block_ids.append(self._take_free())

    def reserve(self, seq: Sequence, extra_tokens: int) -> int:
        """Makes room for up to extra_tokens KV positions past seq's tokens (speculative drafts)
        from free blocks; returns how many fit."""
        bs = self.block_size
        # only blocks that hold no cached prefix: transient drafts must not evict one
        while (len(seq.block_ids) * bs < seq.num_tokens + extra_tokens and self._free
               and self._hash_of[next(iter(self._free))] is None):
            seq.block_ids.append(self._take_free())
        return max(0, min(extra_tokens, len(seq.block_ids) * bs - seq.num_tokens))

    def trim(self, seq: Sequence) -> None:
        """Frees seq's blocks past its tokens (those that held rejected drafts)."""
        keep = self.blocks_for(seq.num_tokens)
        for block in reversed(seq.block_ids[keep:]):
            self._release(block)
        del seq.block_ids[keep:]

    def commit(self, seq: Sequence) -> None:
        """Registers seq's blocks that are now full of computed KV, so that later sequences can
        share them."""
        if not self.caching:
            return
        full = seq.num_computed_tokens // self.block_size
        hashes = self._hashes(seq, full)
        for index in range(seq.num_registered_blocks, full):
            block, h = seq.block_ids[index], hashes[index]
            if self._hash_of[block] is None and h not in self._cached:
                self._cached[h] = block
                self._hash_of[block] = h
        seq.num_registered_blocks = full

    def free(self, seq: Sequence) -> None:
        """Releases seq's blocks: unhashed ones are reused first, cached ones later, a chain's
        tail before its head."""
        for block in reversed(seq.block_ids):
            self._release(block)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free[block] = None
            if self._hash_of[block] is None:
                self._free.move_to_end(block, last=False)

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash_of[block]
        if h is not None:
            del self._cached[h]
            self._hash_of[block] = None
            self.evictions += 1
        self._refs[block] = 1
        return block

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hash chain of seq's first num_blocks full blocks (memoized on the sequence)."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            bs = self.block_size
            tokens = [0] * seq.num_virtual_tokens + seq.all_ids
            extra = _extra_key(seq)
            for index in range(len(hashes), num_blocks):
                parent = hashes[-1] if hashes else b""
                hashes.append(block_hash(parent, tokens[index * bs:(index + 1) * bs], extra))
        return hashes[:num_blocks]
