"""Block manager: allocation, prefix reuse, eviction order, and a stateful model check.

Run: python -m pytest tests/scheduler/test_block_manager.py -q
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from tandem.scheduler.block_manager import BlockManager, NoFreeBlocksError, hash_block

BS = 4


def snapshot(bm: BlockManager) -> tuple:
    seqs = {sid: (list(s.table), s.num_tokens, s.num_hashed, s.last_hash) for sid, s in bm._seqs.items()}
    refs = [bm.ref_count(b) for b in range(bm.num_blocks)]
    hashes = [bm.block_hash(b) for b in range(bm.num_blocks)]
    return (
        seqs,
        refs,
        hashes,
        bm.free_block_ids(),
        bm.cached_blocks(),
        bm.prefix_cache_queries,
        bm.prefix_cache_hits,
    )


def test_allocate_fresh_sequence() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.num_blocks_needed(0) == 0 and bm.num_blocks_needed(4) == 1 and bm.num_blocks_needed(5) == 2
    assert bm.allocate(1, list(range(10))) == 0
    table = bm.block_table(1)
    assert len(table) == 3 and len(set(table)) == 3
    assert all(bm.ref_count(b) == 1 for b in table)
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    bm.free(1)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.free(1)  # idempotent


def test_shared_prompt_reuses_blocks_with_ref_count_two() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 111))  # 2 full blocks + 3 tokens
    assert bm.allocate(1, prompt) == 0
    assert bm.commit_full_blocks(1, prompt) == 2
    assert bm.num_cached_blocks == 2
    assert bm.allocate(2, prompt) == 8
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert t1[:2] == t2[:2]
    assert t1[2] != t2[2]  # the partial last block is private
    assert [bm.ref_count(b) for b in t1] == [2, 2, 1]
    assert bm.prefix_cache_queries == 22 and bm.prefix_cache_hits == 8


def test_divergence_after_shared_prefix() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    b = [1, 2, 3, 4, 5, 6, 70, 80, 90]  # shares the first block only
    bm.allocate(1, a)
    bm.commit_full_blocks(1, a)
    assert bm.allocate(2, b) == 4
    assert bm.block_table(2)[0] == bm.block_table(1)[0]
    assert bm.block_table(2)[1] != bm.block_table(1)[1]
    # Same second block tokens but a different first block: the chained hash must not match.
    bm.allocate(3, [9, 9, 9, 9, 5, 6, 7, 8, 1])
    assert bm.block_table(3)[1] not in bm.block_table(1)


def test_extra_key_separates_caches() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    p = list(range(9))
    bm.allocate(1, p, extra_key=b"lora-a")
    bm.commit_full_blocks(1, p)
    assert bm.allocate(2, p, extra_key=b"lora-b") == 0
    assert bm.allocate(3, p, extra_key=b"lora-a") == 8


def test_at_least_one_token_is_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    p = list(range(8))  # exactly two full blocks
    bm.allocate(1, p)
    bm.commit_full_blocks(1, p)
    # All 8 tokens are cached, but the last must be recomputed: only block 0 is shared.
    assert bm.allocate(2, p) == 4
    assert bm.block_table(2)[0] == bm.block_table(1)[0]
    assert bm.block_table(2)[1] != bm.block_table(1)[1]
    assert bm.allocate(3, [0]) == 0


def test_partial_last_block_is_not_cached() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    p = list(range(7))
    bm.allocate(1, p)
    assert bm.commit_full_blocks(1, p) == 1
    assert bm.num_cached_blocks == 1
    assert bm.block_hash(bm.block_table(1)[1]) is None
    bm.free(1)
    assert bm.allocate(2, [*p, 99]) == 4  # only the full block hits


def test_commit_stops_at_placeholders_and_reserved_positions() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    bm.allocate(1, [1, 2, 3])
    assert bm.commit_full_blocks(1, [1, 2, 3, 4, 5]) == 0  # token 4 has no reserved position yet
    assert bm.append_slots(1, 1)
    assert bm.commit_full_blocks(1, [1, 2, 3, -1]) == 0  # placeholder for a token still in flight
    assert bm.commit_full_blocks(1, [1, 2, 3, 4]) == 1
    bm.append_slots(1, 4)
    assert bm.commit_full_blocks(1, [1, 2, 3, 4, 5, 6, 7, 8], num_computed=7) == 1
    assert bm.commit_full_blocks(1, [1, 2, 3, 4, 5, 6, 7, 8], num_computed=8) == 2


def test_lru_eviction_order_of_free_cached_blocks() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = [1, 1, 1, 1, 2, 2, 2, 2, 0], [3, 3, 3, 3, 0]
    bm.allocate(1, a)
    bm.commit_full_blocks(1, a)
    bm.allocate(2, b)
    bm.commit_full_blocks(2, b)
    a0, a1, a_tail = bm.block_table(1)
    b0, b_tail = bm.block_table(2)
    bm.free(1)
    bm.free(2)
    free = bm.free_block_ids()
    # Uncached blocks are taken first, then cached ones least recently freed first, tail blocks of a
    # sequence before its head.
    assert set(free[:3]) == {a_tail, b_tail, 5}
    assert free[3:] == [a1, a0, b0]
    bm.allocate(3, list(range(100, 116)))  # 4 fresh blocks: evicts a1 only
    assert bm.num_cached_blocks == 2
    assert bm.block_hash(a1) is None and bm.block_hash(a0) is not None
    # a's first block survives and is revived.
    assert bm.allocate(4, [1, 1, 1, 1, 9]) == 4 and bm.block_table(4)[0] == a0


def test_failed_allocate_and_append_leave_state_unchanged() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    p = list(range(9))
    bm.allocate(1, p)
    bm.commit_full_blocks(1, p)
    bm.free(1)  # 2 cached free blocks + 2 uncached
    bm.allocate(2, [50, 51, 52])
    before = snapshot(bm)
    assert not bm.can_allocate(list(range(40, 56)))
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, list(range(40, 56)))
    assert snapshot(bm) == before
    # A hit on a free cached block still consumes a free block: 3 needed, 3 free, all fit ...
    assert bm.can_allocate([*p, 7, 7, 7])
    # ... but not with one more block.
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(3, [*p, 7, 7, 7, 7, 7, 7, 7])
    assert snapshot(bm) == before
    assert bm.append_slots(2, 1)
    assert not bm.can_append(2, 13)
    before = snapshot(bm)
    assert not bm.append_slots(2, 13)
    assert snapshot(bm) == before


def test_ensure_slots_reserves_up_to_a_total_and_block_tables_track_every_table() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    bm.allocate(1, [1, 2, 3])
    assert bm.ensure_slots(1, 2) and bm.num_tokens(1) == 3  # already covered: nothing changes
    assert bm.ensure_slots(1, 4) and bm.num_tokens(1) == 4 and len(bm.block_table(1)) == 1
    assert bm.ensure_slots(1, 5) and len(bm.block_table(1)) == 2
    assert bm.ensure_slots(1, 12) and len(bm.block_table(1)) == 3
    before = snapshot(bm)
    assert not bm.ensure_slots(1, 21)  # two more blocks needed, one free: nothing changes
    assert snapshot(bm) == before
    bm.allocate(2, [5])
    assert dict(bm.block_tables()) == {1: bm.block_table(1), 2: bm.block_table(2)}
    assert bm.block_tables()[1] is bm.block_table(1)  # the manager's own lists, kept current
    bm.free(1)
    assert dict(bm.block_tables()) == {2: bm.block_table(2)}


def test_reset_prefix_cache_and_disabled_caching() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    p = list(range(9))
    bm.allocate(1, p)
    bm.commit_full_blocks(1, p)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and all(bm.block_hash(b) is None for b in range(8))
    assert bm.allocate(2, p) == 0
    off = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    off.allocate(1, p)
    off.commit_full_blocks(1, p)
    assert off.num_cached_blocks == 0 and off.allocate(2, p) == 0


def test_hash_is_stable_and_chained() -> None:
    h0 = hash_block(bytes(16), [1, 2, 3, 4])
    assert h0 == hash_block(bytes(16), (1, 2, 3, 4))
    assert h0.hex() == hash_block(bytes(16), [1, 2, 3, 4]).hex() and len(h0) == 16
    assert hash_block(h0, [1, 2, 3, 4]) != h0
    assert hash_block(bytes(16), [1, 2, 3, 4], b"x") != h0


# -- stateful model check ---------------------------------------------------------------------------

NUM_BLOCKS = 8
PREFIXES = [(1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0), (1, 2, 3, 4, 9, 9), (5,) * 9, ()]


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate/append/commit/free traffic against a model of sequences and block contents."""

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS)
        self.next_id = 0
        self.tokens: dict[int, list[int]] = {}  # all known tokens of each live sequence
        self.extra: dict[int, bytes] = {}
        self.computed: dict[int, int] = {}  # tokens whose KV is written (or in a dispatched step)
        # What each block's KV holds: (extra_key, every token up to the block's end), or None
        # while a new owner may be overwriting it. Only committed blocks get contents.
        self.content: dict[int, tuple[bytes, tuple[int, ...]] | None] = {}

    def _mark_fresh(self, blocks: list[int]) -> None:
        for b in blocks:
            self.content[b] = None

    @rule(
        target=seqs,
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 1), max_size=6),
        extra=st.sampled_from([b"", b"", b"k"]),
        chunk=st.integers(1, 12),
    )
    def allocate(self, prefix: tuple[int, ...], suffix: list[int], extra: bytes, chunk: int):
        prompt = [*prefix, *suffix] or [0]
        sid = self.next_id
        self.next_id += 1
        before = snapshot(self.bm)
        ok = self.bm.can_allocate(prompt, extra)
        assert snapshot(self.bm) == before
        try:
            cached = self.bm.allocate(sid, prompt, extra)
        except NoFreeBlocksError:
            assert not ok
            assert snapshot(self.bm) == before
            return multiple()
        assert ok
        assert cached % BS == 0 and 0 <= cached <= len(prompt) - 1
        table = self.bm.block_table(sid)
        for i, b in enumerate(table[: cached // BS]):  # hits must hold exactly this prefix's KV
            assert self.content.get(b) == (extra, tuple(prompt[: (i + 1) * BS]))
        self._mark_fresh(table[cached // BS :])
        self.tokens[sid], self.extra[sid] = prompt, extra
        self.computed[sid] = cached
        self._step(sid, chunk)
        return sid

    def _step(self, sid: int, chunk: int) -> None:
        # One prefill chunk of the reserved tokens; the batch is then complete, so commit.
        self.computed[sid] = min(self.bm.num_tokens(sid), self.computed[sid] + chunk)
        self._commit(sid, self.computed[sid])

    @rule(sid=seqs, chunk=st.integers(1, 12))
    def prefill_chunk(self, sid, chunk: int) -> None:
        if sid in self.tokens:
            self._step(sid, chunk)

    def _commit(self, sid: int, num_computed: int) -> None:
        toks = self.tokens[sid]
        n = self.bm.commit_full_blocks(sid, toks, num_computed)
        table = self.bm.block_table(sid)
        for i in range(n):
            c = (self.extra[sid], tuple(toks[: (i + 1) * BS]))
            if self.content.get(table[i]) is None:
                self.content[table[i]] = c
            assert self.content[table[i]] == c

    @rule(sid=seqs, new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, sid, new: list[int]) -> None:
        if sid not in self.tokens or self.computed[sid] < len(self.tokens[sid]):
            return  # still in prefill
        old_len = len(self.bm.block_table(sid))
        before = snapshot(self.bm)
        if not self.bm.append_slots(sid, len(new)):
            assert snapshot(self.bm) == before
            return
        self._mark_fresh(self.bm.block_table(sid)[old_len:])
        self.tokens[sid].extend(new)
        self._step(sid, len(new))

    @rule(sid=consumes(seqs))
    def free(self, sid) -> None:
        if sid not in self.tokens:
            return
        self.bm.free(sid)
        del self.tokens[sid], self.extra[sid], self.computed[sid]
        assert sid not in self.bm

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()
        assert self.bm.num_cached_blocks == 0

    @invariant()
    def blocks_are_free_xor_owned(self) -> None:
        bm = self.bm
        owners = [0] * NUM_BLOCKS
        for sid in self.tokens:
            table = bm.block_table(sid)
            assert len(set(table)) == len(table)
            assert len(table) == bm.num_blocks_needed(bm.num_tokens(sid)) and bm.num_tokens(sid) == len(
                self.tokens[sid]
            )
            for b in table:
                owners[b] += 1
        free = bm.free_block_ids()
        assert len(free) == len(set(free)) == bm.num_free_blocks
        for b in range(NUM_BLOCKS):
            assert bm.ref_count(b) == owners[b]
            assert (b in free) == (owners[b] == 0)
        used = sum(1 for n in owners if n)
        assert bm.num_free_blocks + used == NUM_BLOCKS
        assert bm.usage == pytest.approx(used / NUM_BLOCKS)

    @invariant()
    def cached_hashes_match_contents(self) -> None:
        for h, b in self.bm.cached_blocks().items():
            assert self.bm.block_hash(b) == h
            content = self.content.get(b)
            assert content is not None
            extra, toks = content
            parent = bytes(16)
            for i in range(0, len(toks), BS):
                parent = hash_block(parent, toks[i : i + BS], extra)
            assert parent == h
        assert (
            sum(h is not None for h in map(self.bm.block_hash, range(NUM_BLOCKS)))
            == self.bm.num_cached_blocks
        )

    def teardown(self) -> None:
        for sid in list(self.tokens):
            self.bm.free(sid)
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(self.bm.ref_count(b) == 0 for b in range(NUM_BLOCKS))


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
