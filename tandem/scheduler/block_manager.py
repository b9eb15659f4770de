"""Paged KV-cache block manager with prefix caching: the scheduler's map of the worker's KV memory.

Pure Python (the scheduler process never imports torch). Every call costs O(blocks touched).

Calling contract for the scheduler, per sequence (``seq_id`` is any int, unique while allocated):

1. Admission (also re-admission after preemption): ``allocate(seq_id, token_ids)`` reserves blocks
   for all of ``token_ids`` and returns how many leading tokens are already cached; prefill starts
   there. The whole prompt is reserved at once, so later prefill chunks need no ``append_slots``.
2. Tokens fed past the reserved ones (decode, speculative drafts): ``append_slots(seq_id, n)``, or
   ``ensure_slots(seq_id, total)`` with the positions needed in all, before putting them in a batch.
   False means no room and nothing changed: preempt and retry.
3. Once a step's batch is complete (all allocations for it done), for each sequence in it:
   ``commit_full_blocks(seq_id, tokens, num_computed)`` where ``num_computed`` counts the tokens
   whose KV this step or an earlier one writes. Committed full blocks are offered to other
   sequences at once; that is safe because any step that can hit them comes after the step that
   writes them, and the worker runs steps in order. Committing before the batch is complete could
   let another sequence in the same step skip tokens it would then read in that very forward.
   Placeholder ids (negative, the overlap pipeline's "token sampled at step N") are never hashed:
   a block holding one waits for a later commit with the real id. The call returns how many
   blocks are hashed; until ``(that + 1) * block_size`` tokens are computed another call would do
   nothing, so the scheduler skips it meanwhile.
4. ``free(seq_id)`` when the sequence finishes, is cancelled or is preempted (idempotent).

After the worker restarts, its KV contents are gone: call ``reset_prefix_cache()``.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["BlockManager", "NoFreeBlocksError", "hash_block"]

_HASH_BYTES = 16
_ROOT = bytes(_HASH_BYTES)  # parent of a sequence's first block; fixed width keeps encodings unambiguous


class NoFreeBlocksError(RuntimeError):
    """Not enough free KV blocks; the manager's state is unchanged."""


def hash_block(parent: bytes, token_ids: Sequence[int], extra_key: bytes = b"") -> bytes:
    """Chained hash of one full block: depends on every token before it through ``parent``.

    blake2b over a fixed little-endian encoding, not ``hash()`` of a tuple: Python's hash of
    tuples is salted per process for str/bytes members and is only 64 bits, while these digests
    are the same in every process and run, and 128 bits make a collision (which would serve the
    wrong KV) negligible.
    """
    data = b"".join(
        (parent, struct.pack("<I", len(extra_key)), extra_key, struct.pack(f"<{len(token_ids)}q", *token_ids))
    )
    return hashlib.blake2b(data, digest_size=_HASH_BYTES).digest()


@dataclass(slots=True)
class _SeqState:
    table: list[int]
    num_tokens: int  # token positions the table covers for KV writes
    extra_key: bytes
    num_hashed: int  # leading blocks whose chained hash is known (registered or not)
    last_hash: bytes  # hash of block num_hashed - 1, the parent of the next one


class BlockManager:
    """KV blocks 0..num_blocks-1 with ref counts, an LRU free queue and a hash -> block cache map.

    A free block whose hash is still in the cache map keeps its KV and can be revived by a
    sequence with the same prefix until allocation evicts it. The free queue is an OrderedDict
    used as an O(1) LRU: the front is taken first. Freed blocks without a hash go to the front
    (they hold nothing worth keeping); freed cached blocks go to the back, a sequence's tail
    blocks first, so the least recently used and deepest blocks of a prefix are evicted first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cache: dict[bytes, int] = {}
        self._seqs: dict[int, _SeqState] = {}
        self._tables: dict[int, list[int]] = {}  # seq_id -> its _SeqState.table (the same lists)
        self.prefix_cache_queries = 0  # prompt tokens looked up by successful allocate() calls
        self.prefix_cache_hits = 0  # of those, tokens found cached

    # -- sizes and stats ---------------------------------------------------------------------------

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by sequences (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cache)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's block ids in position order. Read-only: it is the manager's own list."""
        return self._seqs[seq_id].table

    def block_tables(self) -> Mapping[int, list[int]]:
        """Every sequence's block table by seq_id, as one mapping (what batch packing looks up, once
        per sequence per step). Read-only: the manager's own dict and lists, kept current."""
        return self._tables

    def num_tokens(self, seq_id: int) -> int:
        """Token positions reserved for the sequence."""
        return self._seqs[seq_id].num_tokens

    # -- allocation --------------------------------------------------------------------------------

    def can_allocate(self, token_ids: Sequence[int], extra_key: bytes = b"") -> bool:
        hits, _ = self._match_prefix(token_ids, extra_key)
        return self._fits(len(token_ids), hits)

    def allocate(self, seq_id: int, token_ids: Sequence[int], extra_key: bytes = b"") -> int:
        """Reserve blocks for a new sequence's tokens; return how many leading tokens are cached.

        At most ``len(token_ids) - 1`` tokens are reported cached: the last one must be computed
        for its logits. A fully cached last block is not shared but given a fresh block (as vLLM
        does), so recomputing that token never writes into a block other sequences read.
        ``extra_key`` separates caches whose KV differs for the same tokens (adapters, images).
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        if not token_ids:
            raise ValueError("cannot allocate an empty sequence")
        hits, last_hash = self._match_prefix(token_ids, extra_key)
        if not self._fits(len(token_ids), hits):
            raise NoFreeBlocksError(
                f"sequence {seq_id}: {len(token_ids)} tokens need "
                f"{self.num_blocks_needed(len(token_ids)) - len(hits)} new blocks, "
                f"{len(self._free)} free ({len(hits)} cached blocks reused)"
            )
        # Revive the hits before taking new blocks, so taking new ones cannot evict them.
        for b in hits:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        table = hits + [self._take_free() for _ in range(self.num_blocks_needed(len(token_ids)) - len(hits))]
        self._seqs[seq_id] = _SeqState(table, len(token_ids), extra_key, len(hits), last_hash)
        self._tables[seq_id] = table
        num_cached = len(hits) * self.block_size
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_cached
        return num_cached

    def can_append(self, seq_id: int, num_new_tokens: int) -> bool:
        s = self._seqs[seq_id]
        return self.num_blocks_needed(s.num_tokens + num_new_tokens) - len(s.table) <= len(self._free)

    def append_slots(self, seq_id: int, num_new_tokens: int) -> bool:
        """Reserve positions for ``num_new_tokens`` more tokens; False (nothing changed) if no room."""
        s = self._seqs[seq_id]
        total = s.num_tokens + num_new_tokens
        need = -(-total // self.block_size) - len(s.table)
        if need > 0:  # most decode steps fit in the last block and skip this
            if need > len(self._free):
                return False
            for _ in range(need):
                s.table.append(self._take_free())
        s.num_tokens = total
        return True

    def ensure_slots(self, seq_id: int, num_tokens: int) -> bool:
        """Reserve positions up to ``num_tokens`` in all (``append_slots`` of whatever is missing);
        False (nothing changed) if no room. One call per sequence per step: it is the decode path."""
        s = self._seqs[seq_id]
        if num_tokens <= s.num_tokens:
            return True
        if num_tokens <= len(s.table) * self.block_size:  # fits the last block: most decode steps
            s.num_tokens = num_tokens
            return True
        need = -(-num_tokens // self.block_size) - len(s.table)
        if need > len(self._free):
            return False
        for _ in range(need):
            s.table.append(self._take_free())
        s.num_tokens = num_tokens
        return True

    def commit_full_blocks(
        self, seq_id: int, token_ids: Sequence[int], num_computed: int | None = None
    ) -> int:
        """Register the full blocks among the first ``num_computed`` (default: all) ``token_ids``.

        Those must be tokens whose KV is written (see the contract above); passing the count
        spares the caller a slice of a long list every step. Only new full blocks are hashed;
        tokens past the reserved positions are ignored. Returns how many leading blocks of the
        sequence are hashed so far.
        """
        s = self._seqs[seq_id]
        n = s.num_tokens
        if num_computed is not None and num_computed < n:
            n = num_computed
        if len(token_ids) < n:
            n = len(token_ids)
        bs = self.block_size
        num_full = n // bs
        if s.num_hashed >= num_full or not self.enable_prefix_caching:  # the common decode step
            return s.num_hashed
        while s.num_hashed < num_full:
            i = s.num_hashed
            block_tokens = token_ids[i * bs : (i + 1) * bs]
            if min(block_tokens) < 0:
                break
            h = hash_block(s.last_hash, block_tokens, s.extra_key)
            b = s.table[i]
            # Another sequence may have computed the same block meanwhile; keep that one cached and
            # this block private (its hash still chains on through last_hash).
            if h not in self._cache and self._hash[b] is None:
                self._cache[h] = b
                self._hash[b] = h
            s.last_hash = h
            s.num_hashed += 1
        return s.num_hashed

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks; unknown ids are ignored so cancel paths can call it freely."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            return
        del self._tables[seq_id]
        for b in reversed(s.table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents, just stop being shareable)."""
        for b in self._cache.values():
            self._hash[b] = None
        self._cache.clear()

    # -- introspection (tests, metrics, debugging) -------------------------------------------------

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (first is taken first)."""
        return list(self._free)

    def cached_blocks(self) -> dict[bytes, int]:
        return dict(self._cache)

    # -- internals ---------------------------------------------------------------------------------

    def _match_prefix(self, token_ids: Sequence[int], extra_key: bytes) -> tuple[list[int], bytes]:
        hits: list[int] = []
        parent = _ROOT
        if not self.enable_prefix_caching:
            return hits, parent
        bs = self.block_size
        # Only blocks wholly before the last token can hit: that token is always recomputed.
        for i in range((len(token_ids) - 1) // bs):
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs], extra_key)
            b = self._cache.get(h)
            if b is None:
                break
            hits.append(b)
            parent = h
        return hits, parent

    def _fits(self, num_tokens: int, hits: list[int]) -> bool:
        revived = sum(1 for b in hits if self._ref[b] == 0)  # hits sitting in the free queue
        return self.num_blocks_needed(num_tokens) - len(hits) + revived <= len(self._free)

    def _take_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        h = self._hash[b]
        if h is not None:  # evict: the new owner overwrites the KV
            del self._cache[h]
            self._hash[b] = None
        self._ref[b] = 1
        return b
