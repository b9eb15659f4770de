"""pack_batch: what lands in a ring slot is exactly the scheduled batch, and the doorbell's flags.

Run: python -m pytest tests/scheduler/test_batch.py -q
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from tandem.messages import Doorbell, SamplingParams
from tandem.scheduler.batch import Packer, pack_batch
from tandem.scheduler.block_manager import BlockManager
from tandem.scheduler.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from tandem.scheduler.sequence import SeqStatus, Sequence
from tandem.shm import SHM_DIR, RingSegment, SlotView, batch_layout, list_segments

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")

MAX_TOKENS = 32  # max_num_batched_tokens of the ring
MAX_SEQS = 4
BLOCK = 4
CTX = 64
MAX_BLOCKS = CTX // BLOCK


@pytest.fixture
def ring() -> Iterator[RingSegment]:
    prefix = f"tandemtestbatch{secrets.token_hex(3)}"
    r = RingSegment.create(batch_layout(MAX_TOKENS, MAX_SEQS, MAX_BLOCKS, 2), prefix=prefix)
    try:
        yield r
    finally:
        r.close()
        r.unlink()
        assert list_segments(prefix) == []


def make_sched(num_blocks: int = 64, budget: int = MAX_TOKENS) -> Scheduler:
    return Scheduler(SchedulerLimits(MAX_SEQS, budget, 16, CTX), BlockManager(num_blocks, BLOCK))


_next_id = iter(range(10**6))


def add(sched: Scheduler, n: int, seed: int = 0, max_tokens: int = 8, **params: object) -> Sequence:
    sid = next(_next_id)
    p = SamplingParams(max_tokens=max_tokens, seed=seed, **params)  # type: ignore[arg-type]
    prompt = [10 + (sid * 7 + i) % 200 for i in range(n)]
    seq = Sequence(sid, f"r{sid}", n, prompt, p, seed=seed, max_tokens=max_tokens)
    sched.add(seq)
    return seq


def pack(
    sched: Scheduler, batch: ScheduledBatch, ring: RingSegment, k: int, packer: Packer | None = None
) -> Doorbell:
    """pack_batch, or with ``packer`` the loop's way: one Packer that remembers each slot's rows."""
    if packer is not None:
        return packer.pack(batch, ring.slot(k), k, sched.blocks.block_tables())
    tables = {it.seq.seq_id: sched.blocks.block_table(it.seq.seq_id) for it in batch.items}
    return pack_batch(batch, ring.slot(k), k, tables)


def check_slot(sched: Scheduler, batch: ScheduledBatch, slot: SlotView, bell: Doorbell, k: int) -> None:
    """Every array of the slot against the batch, computed independently of pack_batch."""
    n_seq, n_tok = len(batch.items), sum(len(it.input_ids) for it in batch.items)
    assert (bell.step, bell.slot, bell.num_tokens, bell.num_seqs) == (batch.step, k, n_tok, n_seq)
    assert (slot.step_id, slot.num_tokens, slot.num_seqs) == (batch.step, n_tok, n_seq)
    a = slot.prefixes()
    assert a["input_ids"].tolist() == [t for it in batch.items for t in it.input_ids]
    assert a["positions"].tolist() == [
        p for it in batch.items for p in range(it.start, it.start + len(it.input_ids))
    ]
    lens = [len(it.input_ids) for it in batch.items]
    assert a["query_lens"].tolist() == lens
    assert a["cu_seqlens"].tolist() == [0, *np.cumsum(lens).tolist()]
    assert a["context_lens"].tolist() == [it.start + len(it.input_ids) for it in batch.items]
    for i, it in enumerate(batch.items):
        seq, p = it.seq, it.seq.params
        table = sched.blocks.block_table(seq.seq_id)
        assert a["block_tables"][i, : len(table)].tolist() == table
        # the context this row attends to is covered by its table
        assert len(table) * BLOCK >= it.start + len(it.input_ids)
        assert a["seq_slots"][i] == seq.worker_slot >= 0
        assert a["prompt_lens"][i] == seq.prompt_len
        assert bool(a["sample_mask"][i]) is it.sample
        assert a["temperature"][i] == np.float32(p.temperature)
        assert a["top_k"][i] == p.top_k
        assert a["top_p"][i] == np.float32(p.top_p)
        assert a["min_p"][i] == np.float32(p.min_p)
        assert a["repetition_penalty"][i] == np.float32(p.repetition_penalty)
        assert a["presence_penalty"][i] == np.float32(p.presence_penalty)
        assert a["frequency_penalty"][i] == np.float32(p.frequency_penalty)
        # 64 bits through an int64 field: the same bit pattern, whatever the sign
        assert int(a["seed"][i]) % 2**64 == seq.seed % 2**64
        if it.sample:  # index of the token being sampled among the outputs: the RNG step
            assert a["sample_step"][i] == it.start + len(it.input_ids) - seq.prompt_len
        assert a["num_logprobs"][i] == (-1 if p.logprobs is None else p.logprobs)
        assert bool(a["want_logits"][i]) is p.return_logits


def test_slot_arrays_match_the_scheduled_batches(ring: RingSegment) -> None:
    sched = make_sched()
    a = add(sched, 5, seed=2**64 - 1, temperature=0.0)
    b = add(
        sched,
        7,
        seed=2**63,
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.3,
        logprobs=3,
        return_logits=True,
    )
    c = add(sched, 40, seed=-(2**63), temperature=1.0)  # chunked: 20 tokens fit in step 0
    d = add(sched, 3, seed=12345)
    b0 = sched.schedule(0)
    assert b0 is not None
    assert [(it.seq, it.start, len(it.input_ids), it.sample) for it in b0.items] == [
        (a, 0, 5, True),
        (b, 0, 7, True),
        (c, 0, 20, False),
    ]
    bell0 = pack(sched, b0, ring, 0)
    check_slot(sched, b0, ring.slot(0), bell0, 0)

    # Overlap: step 1 is built before step 0's tokens are known; a and b feed references to
    # rows 0 and 1 of step 0, c its last 20 prompt tokens, d does not fit the budget yet.
    b1 = sched.schedule(1)
    assert b1 is not None
    assert [(it.seq, it.input_ids if it.start < 20 else None) for it in b1.items[:2]] == [
        (a, [-1]),
        (b, [-2]),
    ]
    assert (b1.items[2].seq, b1.items[2].start, len(b1.items[2].input_ids)) == (c, 20, 20)
    bell1 = pack(sched, b1, ring, 1)
    check_slot(sched, b1, ring.slot(1), bell1, 1)
    check_slot(sched, b0, ring.slot(0), bell0, 0)  # the other slot is untouched

    # step 0's results: tokens 100 and 101 for a and b
    for it, t in zip([x for x in b0.items if x.sample], [100, 101], strict=True):
        it.seq.pending.popleft()
        it.seq.token_ids.append(t)
    b2 = sched.schedule(2)
    assert b2 is not None and d in [it.seq for it in b2.items]
    ring_slot = 0  # slot 0 came back with step 0's result
    bell2 = pack(sched, b2, ring, ring_slot)
    check_slot(sched, b2, ring.slot(ring_slot), bell2, ring_slot)
    refs = [(it.seq, it.input_ids) for it in b2.items if it.seq in (a, b)]
    assert refs == [(a, [-1]), (b, [-2])]  # rows of step 1 this time


def test_seed_bits_survive_the_int64_field(ring: RingSegment) -> None:
    sched = make_sched()
    seeds = [0, 2**63 - 1, 2**63, 2**64 - 1]
    seqs = [add(sched, 2, seed=s) for s in seeds]
    batch = sched.schedule(0)
    assert batch is not None
    pack(sched, batch, ring, 0)
    got = ring.slot(0).seed[: len(seqs)]
    assert got.view(np.uint64).tolist() == seeds
    assert got.tolist() == [0, 2**63 - 1, -(2**63), -1]


def flags(ring: RingSegment, *rows: dict, prefill: dict | None = None) -> Doorbell:
    """Doorbell of one step with a sampling row per ``rows`` entry and maybe a mid-prefill row."""
    sched = make_sched(budget=16)
    for params in rows:
        add(sched, 2, **params)
    if prefill is not None:
        add(sched, 30, **prefill)  # does not fit the 16-token budget: fed in part, no sample
    batch = sched.schedule(0)
    assert batch is not None
    if prefill is not None:
        assert not batch.items[-1].sample
    bell = pack(sched, batch, ring, 0)
    check_slot(sched, batch, ring.slot(0), bell, 0)
    return bell


GREEDY = {"temperature": 0.0}


def test_doorbell_all_greedy(ring: RingSegment) -> None:
    bell = flags(ring, GREEDY, GREEDY)
    assert bell.all_greedy and not bell.any_penalties and not bell.want_logits
    assert bell.max_top_logprobs < 0, "no row wants logprobs"
    assert not flags(ring, GREEDY, {"temperature": 0.8}).all_greedy
    # rows that do not sample this step do not count
    bell = flags(ring, GREEDY, prefill={"temperature": 1.0, "logprobs": 7, "repetition_penalty": 1.3})
    assert bell.all_greedy and not bell.any_penalties and bell.max_top_logprobs < 0


def test_doorbell_logprobs(ring: RingSegment) -> None:
    # logprobs=0 asks for the sampled token's logprob: the argmax-only path cannot give it
    bell = flags(ring, {**GREEDY, "logprobs": 0}, GREEDY)
    assert bell.max_top_logprobs == 0 and not bell.all_greedy
    bell = flags(ring, {"logprobs": 3}, {"logprobs": 5}, {"logprobs": None})
    assert bell.max_top_logprobs == 5


@pytest.mark.parametrize(
    "pen", [{"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": -0.5}]
)
def test_doorbell_penalties(ring: RingSegment, pen: dict) -> None:
    bell = flags(ring, GREEDY, {**GREEDY, **pen})
    assert bell.any_penalties
    assert not flags(ring, GREEDY, prefill={**GREEDY, **pen}).any_penalties


def test_doorbell_want_logits(ring: RingSegment) -> None:
    assert flags(ring, GREEDY, {"return_logits": True}).want_logits
    assert not flags(ring, GREEDY, prefill={"return_logits": True}).want_logits


def test_smaller_batch_after_a_larger_one_in_the_same_slot(ring: RingSegment) -> None:
    sched = make_sched()
    seqs = [add(sched, 8) for _ in range(4)]
    big = sched.schedule(0)
    assert big is not None and big.num_tokens == 32
    pack(sched, big, ring, 0)
    for s in seqs[1:]:
        sched.finish(s, "cancelled")
    seqs[0].pending.popleft()
    seqs[0].token_ids.append(7)
    small = sched.schedule(1)
    assert small is not None and small.num_tokens == 1
    bell = pack(sched, small, ring, 0)
    check_slot(sched, small, ring.slot(0), bell, 0)  # the stale tail is outside the prefixes


def test_packer_rewrites_what_changed_in_a_slot_that_holds_the_same_rows(ring: RingSegment) -> None:
    """The loop's Packer skips the constant columns of rows that hold the same sequence as the last
    time the slot was packed; every change since must still land: new blocks, a sequence that was
    preempted and re-admitted into the same row (new table, another worker slot, prefill chunks
    that do not sample), a row leaving."""
    # No prefix cache: the re-admitted sequence recomputes everything, in chunks of the budget.
    sched = Scheduler(SchedulerLimits(MAX_SEQS, 8, 16, CTX), BlockManager(64, BLOCK, False))
    packer = Packer()
    a = add(sched, 3, temperature=0.0, max_tokens=40)
    b = add(sched, 3, logprobs=2, max_tokens=40)
    c = add(sched, 3, temperature=0.0, repetition_penalty=1.2, max_tokens=40)
    step = 0
    flags_seen = set()

    def launch(k: int) -> ScheduledBatch:
        nonlocal step
        batch = sched.schedule(step)
        assert batch is not None
        bell = pack(sched, batch, ring, k, packer)
        check_slot(sched, batch, ring.slot(k), bell, k)
        sampled = [it.seq.params for it in batch.items if it.sample]
        top = max((-1 if p.logprobs is None else p.logprobs for p in sampled), default=-1)
        pen = any(p.repetition_penalty != 1.0 for p in sampled)
        greedy = all(p.temperature == 0.0 for p in sampled) and top < 0
        assert (bell.max_top_logprobs, bell.any_penalties, bell.all_greedy) == (top, pen, greedy)
        flags_seen.add((top, pen, greedy))
        step += 1
        return batch

    def finish_step(batch: ScheduledBatch) -> None:
        for it in batch.items:
            if it.sample and it.seq.status is SeqStatus.RUNNING and it.seq.epoch == it.epoch:
                it.seq.pending.popleft()
                it.seq.token_ids.append(5 + step % 100)

    def run(n: int) -> None:
        for i in range(n):
            finish_step(inflight.popleft())
            inflight.append(launch(i % 2))

    inflight = deque([launch(0), launch(1)])
    run(12)  # decode steps: blocks of 4 fill up and new ones are appended
    old_slot = c.worker_slot
    sched._preempt(c)  # c leaves its row ...
    free = sched._free_worker_slots
    free.insert(0, free.pop())  # ... others took its worker slot meanwhile ...
    run(1)
    assert c.status is SeqStatus.RUNNING and c.epoch == 1  # ... and it is back in the same row
    assert c.worker_slot != old_slot and c.num_computed < len(c.token_ids)  # prefill in chunks
    run(7)
    assert (2, True, False) in flags_seen and (2, False, False) in flags_seen  # c sampling or not
    sched.finish(b, "cancelled")  # the rows after it move up
    run(4)
    assert a.status is SeqStatus.RUNNING and len(a.output_ids) > 12


# -- a fake worker that only sees the slot -------------------------------------------------------


def fake_token(seed: int, step: int, context: np.ndarray) -> int:
    head = struct.pack("<QQ", seed & 0xFFFF_FFFF_FFFF_FFFF, step)
    return 3 + int.from_bytes(hashlib.blake2b(head + context.tobytes(), digest_size=8).digest()) % 250


class SlotWorker:
    """Runs a step from the slot alone, like the GPU worker: the doorbell's sizes, the slot's arrays,
    a paged KV store and a per-row buffer of the last sampled tokens for references."""

    def __init__(self, num_blocks: int) -> None:
        self.kv = np.full((num_blocks, BLOCK), -1, dtype=np.int64)
        self.prev_sampled = np.full(MAX_SEQS, -1, dtype=np.int64)

    def run(self, slot: SlotView, bell: Doorbell) -> list[int]:
        a = slot.prefixes(bell.num_tokens, bell.num_seqs)
        ids = a["input_ids"].copy()
        refs = ids < 0
        ids[refs] = self.prev_sampled[-ids[refs] - 1]
        assert (ids >= 0).all(), "reference to a row that sampled nothing"
        out = []
        cu = a["cu_seqlens"]
        for i in range(bell.num_seqs):
            lo, hi = int(cu[i]), int(cu[i + 1])
            table = a["block_tables"][i].astype(np.int64)
            pos = a["positions"][lo:hi]
            self.kv[table[pos // BLOCK], pos % BLOCK] = ids[lo:hi]
            if a["sample_mask"][i]:
                ctx = np.arange(int(a["context_lens"][i]))
                context = self.kv[table[ctx // BLOCK], ctx % BLOCK]
                assert (context >= 0).all()
                seed = int(a["seed"][i]) % 2**64
                out.append(fake_token(seed, int(a["sample_step"][i]), context))
        rows = np.flatnonzero(a["sample_mask"])
        self.prev_sampled[rows] = out
        return out


def reference(prompt: list[int], seed: int, max_tokens: int) -> list[int]:
    toks = list(prompt)
    for i in range(max_tokens):
        toks.append(fake_token(seed, i, np.asarray(toks, dtype=np.int64)))
    return toks[len(prompt) :]


@pytest.mark.parametrize("persistent", [False, True], ids=["pack_batch", "Packer"])
@pytest.mark.parametrize("num_blocks", [64, 12])  # 12: preemption under pressure
def test_worker_reading_only_the_slot_reproduces_the_reference(
    ring: RingSegment, num_blocks: int, persistent: bool
) -> None:
    sched = make_sched(num_blocks=num_blocks, budget=MAX_TOKENS)
    packer = Packer() if persistent else None
    worker = SlotWorker(num_blocks)
    seeds = [1, 2**63 + 5, 2**64 - 2, 7, 99]
    seqs = [add(sched, 5 + 7 * i, seed=s, max_tokens=10) for i, s in enumerate(seeds)]
    inflight: deque[tuple[ScheduledBatch, int, list[int]]] = deque()
    free = deque([0, 1])
    step = 0
    while any(s.status is not SeqStatus.FINISHED for s in seqs):
        while len(inflight) < 2 and free:  # overlap: two steps in flight, one per ring slot
            batch = sched.schedule(step)
            if batch is None:
                break
            k = free.popleft()
            bell = pack(sched, batch, ring, k, packer)
            check_slot(sched, batch, ring.slot(k), bell, k)
            inflight.append((batch, k, worker.run(ring.slot(k), bell)))
            step += 1
        assert inflight, "stalled"
        batch, k, tokens = inflight.popleft()
        free.append(k)
        for it, t in zip([x for x in batch.items if x.sample], tokens, strict=True):
            s = it.seq
            if s.status is not SeqStatus.RUNNING or s.epoch != it.epoch:
                continue
            s.pending.popleft()
            s.token_ids.append(t)
            if len(s.output_ids) >= s.max_tokens:
                sched.finish(s, "length")
    for s in seqs:
        assert s.output_ids == reference(s.token_ids[: s.prompt_len], s.seed, 10)
    assert (sched.num_preemptions > 0) == (num_blocks == 12)
    assert sched.blocks.num_free_blocks == num_blocks
