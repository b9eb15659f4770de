"""The scheduler's real core (EngineCore) against a fake paged-KV worker that reads the ring.

No processes: a `Sim` calls the core as the scheduler process does (add, cancel, launch, apply
the results one or two steps later), and a `FakeWorker` plays the GPU from the packed ring slot
alone: it keeps a real paged KV store indexed by the slot's block tables, resolves `-(1 + row)`
references from its previous step's samples, and samples a token that is a hash of (seed, sample
index, every context token read back from its KV). So any wrong block table, prefix-cache hit on
the wrong block, skipped or doubled position, misrouted reference, stale result applied after a
preemption or ignored max_tokens changes the output, and outputs are checked against
`reference()`, which unrolls the same function with no scheduler at all.

Run: python -m pytest tests/scheduler/test_scheduler_policy.py -q
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tandem.config import EngineConfig
from tandem.formats.tiny import write_tiny_gguf
from tandem.messages import Doorbell, OutputBatch, RequestError, SamplingParams, StepResult, SubmitRequest
from tandem.scheduler.block_manager import BlockManager
from tandem.scheduler.core import EngineCore
from tandem.scheduler.scheduler import AdmissionError, ScheduledBatch, Scheduler, SchedulerLimits
from tandem.scheduler.sequence import SeqStatus, Sequence
from tandem.shm import batch_layout
from tandem.shm.layout import RingLayout
from tandem.shm.slot import SlotView
from tandem.tokenizer.tokenizer import Tokenizer

EOS = 2  # <|im_end|> in the tiny vocabulary (its eos ids are 0 and 2)
FIRST_BYTE_TOKEN = 3  # byte b is token 3 + b in the tiny vocabulary


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return Tokenizer.from_gguf(path)


# -- the fake model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFn:
    """The fake model: a deterministic token for (seed, sample index, context).

    Depending on the whole context (not just its length) is what makes KV mix-ups visible.
    ``eos_every`` > 0 makes about one token in that many an EOS, so stops happen mid-run.
    """

    eos_every: int = 0

    def __call__(self, seed: int, sample_index: int, context: np.ndarray) -> int:
        head = struct.pack("<QQ", seed & 0xFFFF_FFFF_FFFF_FFFF, sample_index)
        v = int.from_bytes(hashlib.blake2b(head + context.astype("<i8").tobytes(), digest_size=8).digest())
        if self.eos_every and v % self.eos_every == 0:
            return EOS
        return FIRST_BYTE_TOKEN + (v >> 16) % 256


class FakeWorker:
    """Executes steps in order from the ring slot alone, against a paged KV store, as the GPU
    worker does."""

    def __init__(self, num_blocks: int, block_size: int, fn: TokenFn) -> None:
        self.bs = block_size
        self.kv = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self.fn = fn
        self.prev: dict[int, tuple[int, int]] = {}  # row -> (worker slot, token) sampled by the last step
        self.last_step = -1

    def execute(self, slot: SlotView, bell: Doorbell) -> StepResult:
        assert bell.step == self.last_step + 1, "steps must reach the worker in order"
        n_seq = bell.num_seqs
        cu = slot.cu_seqlens[: n_seq + 1].tolist()
        sampled: dict[int, tuple[int, int]] = {}
        tokens: list[int] = []
        for row in range(n_seq):
            wslot = int(slot.seq_slots[row])
            ids = []
            for t in slot.input_ids[cu[row] : cu[row + 1]].tolist():
                if t < 0:
                    # The real worker would silently read whatever its buffer holds; be strict.
                    ref_slot, ref_tok = self.prev[-1 - t]
                    assert ref_slot == wslot, "reference to another sequence's sample"
                    ids.append(ref_tok)
                else:
                    ids.append(t)
            table = slot.block_tables[row].astype(np.int64)
            pos = slot.positions[cu[row] : cu[row + 1]].astype(np.int64)
            self.kv[table[pos // self.bs], pos % self.bs] = ids
            if slot.sample_mask[row]:
                ctx_pos = np.arange(int(slot.context_lens[row]))
                context = self.kv[table[ctx_pos // self.bs], ctx_pos % self.bs]
                assert (context >= 0).all(), "attention would read KV that no step wrote"
                t = self.fn(int(slot.seed[row]), int(slot.sample_step[row]), context)
                sampled[len(tokens)] = (wslot, t)
                tokens.append(t)
        self.prev = sampled
        self.last_step = bell.step
        ids_bytes = np.asarray(tokens, dtype=np.int64).tobytes()
        return StepResult(bell.step, bell.slot, len(tokens), ids_bytes, b"")


class HeapRing:
    """The ring's slots over ordinary memory: the core packs them exactly as it packs shm."""

    def __init__(self, layout: RingLayout) -> None:
        self._buf = memoryview(bytearray(layout.total_size))
        self._slots = [SlotView(k, self._buf, layout) for k in range(layout.depth)]

    def slot(self, k: int) -> SlotView:
        return self._slots[k]


# -- requests and the reference --------------------------------------------------------------------


@dataclass
class Req:
    rid: str
    prompt: list[int]
    max_tokens: int | None = 8
    arrival: int = 0  # tick at which it is submitted
    cancel_at: int | None = None  # tick at which the client cancels it
    seed: int = 0
    ignore_eos: bool = True
    stop_token_ids: tuple[int, ...] = ()

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=0.0,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids),
        )


def reference(fn: TokenFn, req: Req, context_length: int) -> tuple[list[int], str]:
    """Outputs and finish reason with no scheduler: one token at a time over the full context."""
    toks = list(req.prompt)
    max_tokens = req.max_tokens or context_length - len(toks)
    out: list[int] = []
    while True:
        t = fn(req.seed, len(out), np.asarray(toks, dtype=np.int64))
        toks.append(t)
        out.append(t)
        if (not req.ignore_eos and t in (0, EOS)) or t in req.stop_token_ids:
            return out, "stop"
        if len(out) >= max_tokens or len(toks) >= context_length:
            return out, "length"


def prompt(n: int, base: int = 0) -> list[int]:
    return [FIRST_BYTE_TOKEN + (base + 7 * i) % 256 for i in range(n)]


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    reason: str | None = None
    stop_reason: str | int | None = None
    num_cached: int = 0
    ends: int = 0  # terminal events sent: must end up exactly 1


@dataclass
class Item:
    """What a step did for one request (the batch log tests look at)."""

    rid: str
    start: int
    n: int
    sample: bool
    ref: bool  # the last input is a reference to the previous step's sample


class Sim:
    """The real EngineCore, driven tick by tick; ``depth`` is 1 (sync) or 2 (overlap)."""

    def __init__(
        self,
        tok: Tokenizer,
        fn: TokenFn | None = None,
        *,
        depth: int,
        num_blocks: int = 256,
        block_size: int = 4,
        max_num_seqs: int = 4,
        max_num_batched_tokens: int = 16,
        context_length: int = 64,
        max_queue: int = 64,
        prefix_caching: bool = True,
    ) -> None:
        self.fn = fn or TokenFn()
        cfg = EngineConfig(
            model_path="",
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queue=max_queue,
            overlap=depth == 2,
            enable_prefix_caching=prefix_caching,
        )
        blocks_per_seq = -(-context_length // block_size)
        ring = HeapRing(batch_layout(max_num_batched_tokens, max_num_seqs, blocks_per_seq, cfg.ring_depth))
        self.ring = ring
        self.core = EngineCore(cfg, tok, context_length, ring, num_blocks, clock=self._clock)
        self.limits = self.core.sched.limits
        self.worker = FakeWorker(num_blocks, block_size, self.fn)
        self.depth = depth
        self.results: deque[StepResult] = deque()  # what the worker answered, oldest first
        self.seqs: dict[str, Sequence] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.rejected: dict[str, RequestError] = {}
        self.log: list[list[Item]] = []
        self.discarded = 0  # results that came back for sequences no longer there to take them
        self._last_end: dict[str, tuple[int, int]] = {}  # rid -> (epoch, end of its last chunk)
        self._now = 0.0

    def _clock(self) -> float:
        self._now += 0.001
        return self._now

    @property
    def sched(self) -> Scheduler:
        return self.core.sched

    @property
    def step(self) -> int:
        return self.core.step

    # -- requests ------------------------------------------------------------------------
    def submit(self, req: Req) -> Sequence:
        """core.add; raises AdmissionError with the code of a refusal."""
        out = self.core.add(SubmitRequest(req.rid, list(req.prompt), req.params(), self._clock()))
        if out.errors:
            err = out.errors[0]
            raise AdmissionError(err.code, err.message)
        seq = self.sched.by_request[req.rid]
        self.seqs[req.rid] = seq
        self.outcomes[req.rid] = Outcome()
        return seq

    def try_submit(self, req: Req) -> None:
        out = self.core.add(SubmitRequest(req.rid, list(req.prompt), req.params(), self._clock()))
        if out.errors:
            self.rejected[req.rid] = out.errors[0]
        else:
            self.seqs[req.rid] = self.sched.by_request[req.rid]
            self.outcomes[req.rid] = Outcome()

    def cancel(self, rid: str) -> None:
        self._take(self.core.cancel(rid))

    def _take(self, out: OutputBatch) -> None:
        for d in out.deltas:
            o = self.outcomes[d.request_id]
            assert o.ends == 0, f"a delta after {d.request_id}'s terminal frame"
            o.tokens += d.token_ids
            o.text += d.text
        for f in out.finished:
            o = self.outcomes[f.request_id]
            o.reason, o.stop_reason, o.num_cached = f.finish_reason, f.stop_reason, f.cached_tokens
            o.ends += 1
        for e in out.errors:
            o = self.outcomes[e.request_id]
            o.reason = f"error: {e.code}"
            o.ends += 1

    # -- the pipeline --------------------------------------------------------------------
    def launch(self) -> bool:
        bell = self.core.launch()
        if bell is None:
            return False
        batch = self.core.inflight[-1].batch
        self.check_batch(batch)
        self.results.append(self.worker.execute(self.ring.slot(bell.slot), bell))
        return True

    def apply_oldest(self) -> None:
        """core.apply for the oldest step in flight (and count the tokens it must drop)."""
        batch = self.core.inflight[0].batch
        self.discarded += sum(
            1
            for it in batch.items
            if it.sample and (it.seq.status is not SeqStatus.RUNNING or it.seq.epoch != it.epoch)
        )
        self._take(self.core.apply(self.results.popleft()))

    def tick(self, t: int, reqs: tuple[Req, ...] | list[Req] = ()) -> None:
        for r in reqs:
            if r.arrival == t:
                self.try_submit(r)
        for r in reqs:
            if r.cancel_at == t:
                self.cancel(r.rid)
        while self.launch():
            pass
        if self.core.inflight:
            self.apply_oldest()
        self.check_state()

    @property
    def idle(self) -> bool:
        return self.core.idle

    def finish_all(self, first_tick: int = 0, max_ticks: int = 3000) -> Sim:
        """Tick until nothing is left (requests submitted by hand), then check nothing leaked."""
        for t in range(first_tick, first_tick + max_ticks):
            if self.idle:
                break
            self.tick(t)
        assert self.idle, "no progress"
        self.check_drained()
        return self

    def run(self, reqs: list[Req], max_ticks: int = 3000) -> Sim:
        last_event = max(max(r.arrival, r.cancel_at or 0) for r in reqs)
        for t in range(max_ticks):
            self.tick(t, reqs)
            if t >= last_event and self.idle:
                break
        else:
            stuck = [s.request_id for s in [*self.sched.running, *self.sched.waiting]]
            raise AssertionError(f"no progress after {max_ticks} ticks; still unfinished: {stuck}")
        self.check_drained()
        return self

    # -- invariants ----------------------------------------------------------------------
    def check_batch(self, batch: ScheduledBatch) -> None:
        lim, bm = self.limits, self.sched.blocks
        assert 0 < batch.num_tokens <= lim.max_num_batched_tokens
        assert batch.num_tokens == sum(len(it.input_ids) for it in batch.items)
        assert len(batch.items) <= lim.max_num_seqs
        assert len({it.seq.seq_id for it in batch.items}) == len(batch.items), "a sequence twice in a step"
        entry = []
        for it in batch.items:
            seq, n = it.seq, len(it.input_ids)
            end = it.start + n
            assert seq.status is SeqStatus.RUNNING and it.epoch == seq.epoch and n >= 1
            assert bm.num_tokens(seq.seq_id) >= end, "fed positions without reserved KV"
            if bm.enable_prefix_caching:  # every full block of known computed tokens is offered at once
                full = min(seq.num_computed, len(seq.token_ids)) // bm.block_size
                assert bm._seqs[seq.seq_id].num_hashed == full, "a full block left uncommitted"
            refs = [i for i, t in enumerate(it.input_ids) if t < 0]
            assert refs in ([], [n - 1]), "only the last fed token may be a previous step's sample"
            known = it.input_ids[: n - len(refs)]
            assert known == seq.token_ids[it.start : it.start + len(known)]
            if it.sample:  # the whole prompt and every known token is computed by this step
                assert end >= seq.prompt_len and end == len(seq.token_ids) + len(refs)
            else:
                assert not refs and end < len(seq.token_ids)
            prev = self._last_end.get(seq.request_id)
            if prev is not None and prev[0] == it.epoch:
                assert it.start == prev[1], "chunks of one sequence must be contiguous"
            else:  # (re)admission starts after the prefix-cache hits, at a block boundary
                assert it.start % bm.block_size == 0 and it.start < len(seq.token_ids)
                if it.epoch == 0:
                    assert it.start == seq.num_cached
            self._last_end[seq.request_id] = (it.epoch, end)
            entry.append(Item(seq.request_id, it.start, n, it.sample, bool(refs)))
        self.log.append(entry)

    def check_state(self) -> None:
        sched, bm = self.sched, self.sched.blocks
        owners: Counter[int] = Counter()
        assert len(sched.running) <= self.limits.max_num_seqs
        for seq in sched.running:
            assert seq.status is SeqStatus.RUNNING and seq.seq_id in bm
            table = bm.block_table(seq.seq_id)
            assert len(table) == bm.num_blocks_needed(bm.num_tokens(seq.seq_id))
            assert seq.num_computed <= bm.num_tokens(seq.seq_id)
            owners.update(table)
        for b in range(bm.num_blocks):
            assert bm.ref_count(b) == owners[b], f"block {b}: ref count vs. owners"
        assert set(bm.free_block_ids()) == {b for b in range(bm.num_blocks) if owners[b] == 0}
        slots = [s.worker_slot for s in sched.running]
        assert len(set(slots)) == len(slots) and all(0 <= s < self.limits.max_num_seqs for s in slots)
        for seq in self.seqs.values():
            if seq.status is not SeqStatus.RUNNING:
                assert seq.seq_id not in bm, f"{seq.request_id} ({seq.status}) still holds blocks"

    def check_drained(self) -> None:
        sched, bm = self.sched, self.sched.blocks
        assert not sched.running and not sched.waiting and not sched.by_request
        assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
        assert sorted(sched._free_worker_slots) == list(range(self.limits.max_num_seqs))
        for rid, o in self.outcomes.items():
            assert o.ends == 1, f"{rid} ended {o.ends} times"
            assert self.seqs[rid].output_ids == o.tokens


def run_both(tok: Tokenizer, reqs: list[Req], **kw: int) -> tuple[Sim, Sim]:
    return Sim(tok, depth=1, **kw).run(reqs), Sim(tok, depth=2, **kw).run(reqs)


def assert_reference(sim: Sim, reqs: list[Req]) -> None:
    for r in reqs:
        if r.rid in sim.rejected or sim.outcomes[r.rid].reason == "cancelled":
            continue
        o = sim.outcomes[r.rid]
        assert (o.tokens, o.reason) == reference(sim.fn, r, sim.limits.context_length), r.rid


# -- continuous batching ---------------------------------------------------------------------------


def test_continuous_batching_chunks_prefill_and_keeps_decoding(tok: Tokenizer) -> None:
    reqs = [
        Req("a", prompt(6), max_tokens=12, arrival=0),
        Req("b", prompt(30, 1), max_tokens=4, arrival=3),  # long: chunked under the 8-token budget
        Req("c", prompt(5, 2), max_tokens=3, arrival=3),
        Req("d", prompt(7, 3), max_tokens=3, arrival=4),  # the 4th: waits for a free seat
    ]
    sim = Sim(tok, depth=2, max_num_seqs=3, max_num_batched_tokens=8).run(reqs)
    assert_reference(sim, reqs)
    assert all(sim.outcomes[r.rid].reason == "length" for r in reqs)

    steps_of = {r.rid: [i for i, e in enumerate(sim.log) if any(x.rid == r.rid for x in e)] for r in reqs}
    b_items = [x for e in sim.log for x in e if x.rid == "b"]
    b_prefill = [x for x in b_items if x.start < 30]
    assert len(b_prefill) >= 4 and sum(x.n for x in b_prefill) == 30, "b's prompt is fed in chunks"
    assert [x.sample for x in b_prefill] == [False] * (len(b_prefill) - 1) + [True]
    # a keeps decoding (one token a step) in the steps that carry b's prompt chunks
    for e in sim.log:
        rids = {x.rid: x for x in e}
        if "b" in rids and not rids["b"].sample and "a" in rids:
            assert rids["a"].n == 1 and rids["a"].sample
    assert any("a" in {x.rid for x in e} and "b" in {x.rid for x in e} for e in sim.log)
    # d only starts once one of a, b, c has left: never 4 running
    first_d = steps_of["d"][0]
    assert all(len(e) <= 3 for e in sim.log)
    assert min(steps_of[r][-1] for r in "abc") < first_d


def test_decode_first_then_admission_fills_the_budget(tok: Tokenizer) -> None:
    sim = Sim(tok, depth=1, max_num_seqs=4, max_num_batched_tokens=10)
    sim.submit(Req("a", prompt(4), max_tokens=20))
    sim.tick(0)  # a's prefill (4 tokens) runs and samples
    sim.submit(Req("b", prompt(25, 5), max_tokens=2))
    sim.tick(1)
    last = sim.log[-1]
    assert [(x.rid, x.n) for x in last] == [("a", 1), ("b", 9)]  # a's decode first, b gets the rest
    assert sum(x.n for x in last) == 10


# -- overlap ---------------------------------------------------------------------------------------


def test_overlap_and_sync_give_identical_outputs(tok: Tokenizer) -> None:
    fn = TokenFn(eos_every=9)
    reqs = [
        Req(
            f"r{i}",
            prompt(3 + 5 * i, i),
            max_tokens=6 + 3 * i,
            arrival=i,
            seed=100 + i,
            ignore_eos=i % 2 == 0,
        )
        for i in range(6)
    ]
    sync = Sim(tok, fn, depth=1, max_num_seqs=3, max_num_batched_tokens=12).run(reqs)
    over = Sim(tok, fn, depth=2, max_num_seqs=3, max_num_batched_tokens=12).run(reqs)
    for r in reqs:
        assert sync.outcomes[r.rid].tokens == over.outcomes[r.rid].tokens, r.rid
        assert sync.outcomes[r.rid].text == over.outcomes[r.rid].text, r.rid
    assert_reference(sync, reqs)
    assert_reference(over, reqs)
    assert sync.discarded == 0
    stopped = [r.rid for r in reqs if sync.outcomes[r.rid].reason == "stop"]
    assert stopped and over.discarded >= len(stopped)  # each EOS was seen one step late
    # overlap feeds a reference to the token still in flight instead of waiting for it
    assert any(x.ref for e in over.log for x in e) and not any(x.ref for e in sync.log for x in e)


def test_overlap_feeds_references_and_sync_never_does(tok: Tokenizer) -> None:
    req = Req("a", prompt(5), max_tokens=10)
    sync, over = run_both(tok, [req])
    # 10 samples: the prefill's, then 9 decode inputs, each the token sampled one step before
    assert [(x.start, x.n, x.ref) for e in sync.log for x in e] == [(0, 5, False)] + [
        (p, 1, False) for p in range(5, 14)
    ]
    assert [(x.start, x.n, x.ref) for e in over.log for x in e] == [(0, 5, False)] + [
        (p, 1, True) for p in range(5, 14)
    ]
    assert over.outcomes["a"].tokens == sync.outcomes["a"].tokens == reference(TokenFn(), req, 64)[0]


@pytest.mark.parametrize("how", ["stop_token", "eos"])
def test_overlap_stop_is_found_one_step_late_and_the_extra_token_dropped(tok: Tokenizer, how: str) -> None:
    base = Req("a", prompt(6), max_tokens=20, seed=7)
    ref, _ = reference(TokenFn(), base, 64)
    k = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i])  # first fresh token after 3
    if how == "stop_token":
        req = Req("a", prompt(6), max_tokens=20, seed=7, stop_token_ids=(ref[k],))
        fn = TokenFn()
    else:  # a fake model whose EOS falls on the same sample: pick eos_every so token k is EOS
        req = Req("a", prompt(6), max_tokens=20, seed=7, ignore_eos=False)
        fn = next(
            f
            for f in (TokenFn(e) for e in range(2, 400))
            if reference(f, req, 64)[0][-1] == EOS and len(reference(f, req, 64)[0]) >= 3
        )
    want, reason = reference(fn, req, 64)
    assert reason == "stop"
    sync = Sim(tok, fn, depth=1).run([req])
    over = Sim(tok, fn, depth=2).run([req])
    for sim in (sync, over):
        o = sim.outcomes["a"]
        assert (o.tokens, o.reason, o.stop_reason) == (want, "stop", want[-1])
        assert sim.seqs["a"].output_ids == want  # the token after the stop never reached the sequence
    assert sync.discarded == 0
    assert over.discarded == 1, "overlap samples one token past the stop, and drops it"
    assert sync.step == len(want) and over.step == len(want) + 1


def test_max_tokens_stop_is_known_ahead_even_with_overlap(tok: Tokenizer) -> None:
    req = Req("a", prompt(5), max_tokens=6)
    sync, over = run_both(tok, [req])
    assert over.discarded == 0 and over.step == sync.step == 6  # nothing scheduled past max_tokens
    assert over.outcomes["a"].tokens == sync.outcomes["a"].tokens == reference(TokenFn(), req, 64)[0]


# -- preemption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
def test_preemption_recomputes_and_matches_unpressured_outputs(tok: Tokenizer, depth: int) -> None:
    fn = TokenFn(eos_every=40)
    reqs = [
        Req(f"r{i}", prompt(6 + 3 * i, i), max_tokens=14, arrival=i // 2, seed=i, ignore_eos=i % 2 == 1)
        for i in range(5)
    ]
    roomy = Sim(tok, fn, depth=depth, num_blocks=64, max_num_seqs=4).run(reqs)
    tight = Sim(tok, fn, depth=depth, num_blocks=10, max_num_seqs=4).run(reqs)  # 40 tokens of KV
    assert roomy.sched.num_preemptions == 0
    assert tight.sched.num_preemptions > 0
    for r in reqs:
        assert tight.outcomes[r.rid].tokens == roomy.outcomes[r.rid].tokens, r.rid
        assert tight.outcomes[r.rid].reason == roomy.outcomes[r.rid].reason
    assert_reference(tight, reqs)
    assert max(s.epoch for s in tight.seqs.values()) >= 1


def test_preempted_sequence_goes_back_to_the_front_of_the_queue(tok: Tokenizer) -> None:
    sim = Sim(tok, depth=1, num_blocks=6, max_num_seqs=3, max_num_batched_tokens=32)
    for i in range(3):
        sim.submit(Req(f"r{i}", prompt(7, i), max_tokens=9))  # 2 blocks each: the pool is full at once
    sim.tick(0)
    assert [s.request_id for s in sim.sched.running] == ["r0", "r1", "r2"]
    assert sim.sched.blocks.num_free_blocks == 0
    sim.tick(1)  # the 1st decode input goes to position 7: still in the 2nd block
    assert sim.sched.num_preemptions == 0
    sim.tick(2)  # r0's next input needs a 3rd block: the newest, r2, makes room
    assert sim.sched.num_preemptions == 1
    victim = sim.seqs["r2"]
    assert victim.status is SeqStatus.WAITING and victim.epoch == 1 and victim.num_computed == 0
    assert sim.sched.waiting[0] is victim and victim.seq_id not in sim.sched.blocks
    sim.finish_all(first_tick=3)
    for i in range(3):
        want = reference(sim.fn, Req(f"r{i}", prompt(7, i), max_tokens=9), 64)[0]
        assert sim.outcomes[f"r{i}"].tokens == want


# -- worker loss ------------------------------------------------------------------------------------


def lose_worker(sim: Sim, num_blocks: int = 256) -> None:
    """What the process shell does when the worker dies: the core forgets the steps in flight,
    and a fresh worker (empty KV) takes the next step."""
    sim._take(sim.core.worker_lost("worker killed by SIGKILL"))
    sim.core.worker_ready(num_blocks)
    sim.results.clear()
    sim.worker = FakeWorker(num_blocks, sim.worker.bs, sim.fn)
    sim.worker.last_step = sim.core.step - 1


@pytest.mark.parametrize("depth", [1, 2])
def test_worker_loss_replays_requests_that_sent_nothing_and_fails_the_others(
    tok: Tokenizer, depth: int
) -> None:
    sim = Sim(tok, depth=depth, max_num_batched_tokens=16)
    streaming = Req("streaming", prompt(5, 1), max_tokens=20)
    prefilling = Req("prefilling", prompt(40, 2), max_tokens=6, seed=3)  # 3 chunks of prefill
    queued = Req("queued", prompt(6, 3), max_tokens=5)
    sim.submit(streaming)
    for t in range(3):
        sim.tick(t)
    sim.submit(prefilling)
    sim.tick(3)
    assert sim.outcomes["streaming"].tokens and not sim.outcomes["prefilling"].tokens
    assert sim.seqs["prefilling"].status is SeqStatus.RUNNING
    sim.submit(queued)
    lose_worker(sim)
    assert sim.outcomes["streaming"].reason == "error: worker_died"
    assert sim.seqs["prefilling"].replays == 1 and sim.sched.waiting[0] is sim.seqs["prefilling"]
    sim.finish_all(first_tick=4)
    for r in (prefilling, queued):  # the client sees one undisturbed reply
        assert (sim.outcomes[r.rid].tokens, sim.outcomes[r.rid].reason) == reference(sim.fn, r, 64)


def test_a_request_lost_twice_before_its_first_token_fails(tok: Tokenizer) -> None:
    sim = Sim(tok, depth=2, max_num_batched_tokens=8)
    sim.submit(Req("poison", prompt(40, 4), max_tokens=4))
    sim.tick(0)
    lose_worker(sim)
    assert sim.outcomes["poison"].ends == 0
    sim.tick(1)
    lose_worker(sim)
    assert sim.outcomes["poison"].reason == "error: worker_died" and sim.outcomes["poison"].ends == 1
    sim.finish_all(first_tick=2)


def test_a_failed_step_spares_a_sequence_preempted_and_readmitted_since(tok: Tokenizer) -> None:
    """A step that fails on the worker fails the sequences it sampled for, unless one of them was
    preempted after the step went out: its entry is stale (older epoch), even if the sequence is
    running again by the time the failure arrives, and it finishes as if nothing happened."""
    sim = Sim(tok, depth=2)
    req = Req("r0", prompt(7), max_tokens=6)
    seq = sim.submit(req)
    assert sim.launch()  # step 0: the prefill, sampling the first token
    sim.sched._preempt(seq)  # as KV pressure at the next launch would
    assert sim.launch() and seq.status is SeqStatus.RUNNING and seq.epoch == 1  # back, recomputing
    stale = sim.results[0]
    sim.results[0] = StepResult(stale.step, stale.slot, 0, b"", b"", error="RuntimeError: boom")
    sim.apply_oldest()
    assert sim.outcomes["r0"].ends == 0 and seq.status is SeqStatus.RUNNING
    sim.finish_all(first_tick=1)
    assert (sim.outcomes["r0"].tokens, sim.outcomes["r0"].reason) == reference(sim.fn, req, 64)


# -- admission -------------------------------------------------------------------------------------


def make_sched(**kw: int) -> Scheduler:
    limits = SchedulerLimits(
        max_num_seqs=kw.get("max_num_seqs", 4),
        max_num_batched_tokens=kw.get("max_num_batched_tokens", 16),
        max_queue=kw.get("max_queue", 8),
        context_length=kw.get("context_length", 64),
    )
    return Scheduler(limits, BlockManager(kw.get("num_blocks", 32), kw.get("block_size", 4)))


def make_seq(rid: str, n: int, max_tokens: int | None = 4, seq_id: int = 0, ctx: int = 64) -> Sequence:
    p = SamplingParams(max_tokens=max_tokens)
    return Sequence(seq_id, rid, n, prompt(n), p, seed=0, max_tokens=max_tokens or ctx - n)


def test_prompt_as_long_as_the_context_is_refused_with_both_counts() -> None:
    s = make_sched(context_length=64)
    for n in (64, 100):
        with pytest.raises(AdmissionError) as e:
            s.check_feasible(n, None)
        assert e.value.code == "context_length"
        assert str(n) in str(e.value) and "64" in str(e.value)
    s.check_feasible(63, None)  # room for one generated token
    with pytest.raises(AdmissionError) as e:
        s.add(make_seq("x", 64, max_tokens=None))
    assert e.value.code == "context_length" and not s.waiting and "x" not in s.by_request


def test_prompt_plus_max_tokens_past_the_context_is_refused() -> None:
    s = make_sched(context_length=64)
    s.check_feasible(60, 4)
    with pytest.raises(AdmissionError) as e:
        s.check_feasible(60, 5)
    assert e.value.code == "context_length"
    assert all(x in str(e.value) for x in ("60", "5", "65", "64"))


def test_request_bigger_than_the_kv_pool_is_refused_up_front(tok: Tokenizer) -> None:
    s = make_sched(num_blocks=4, block_size=4, context_length=64)  # 16 tokens of KV
    s.check_feasible(10, 6)
    with pytest.raises(AdmissionError) as e:
        s.check_feasible(10, 7)
    assert e.value.code == "context_length" and "16" in str(e.value)
    with pytest.raises(AdmissionError):
        s.check_feasible(16, None)  # prompt alone fills the pool: no room for a token
    with pytest.raises(AdmissionError):
        s.add(make_seq("big", 12, max_tokens=10))
    assert not s.waiting
    # Without max_tokens it is admitted and ends with "length" when the pool is full, instead of
    # waiting forever for blocks that can never be free.
    sim = Sim(tok, depth=2, num_blocks=4, block_size=4, context_length=64)
    req = Req("nomax", prompt(5), max_tokens=None)
    sim.run([req])
    o = sim.outcomes["nomax"]
    assert o.reason == "length" and len(o.tokens) == 16 - 5
    assert o.tokens == reference(sim.fn, req, 64)[0][: 16 - 5]


def test_queue_full_is_busy() -> None:
    s = make_sched(max_queue=2)
    s.add(make_seq("a", 4, seq_id=0))
    s.add(make_seq("b", 4, seq_id=1))
    with pytest.raises(AdmissionError) as e:
        s.add(make_seq("c", 4, seq_id=2))
    assert e.value.code == "busy" and "2" in str(e.value)
    assert [q.request_id for q in s.waiting] == ["a", "b"] and "c" not in s.by_request
    s.schedule(0)  # both admitted: the queue has room again
    s.add(make_seq("c", 4, seq_id=2))


def test_duplicate_request_id_is_refused() -> None:
    s = make_sched()
    s.add(make_seq("a", 4, seq_id=0))
    with pytest.raises(AdmissionError) as e:
        s.add(make_seq("a", 5, seq_id=1))
    assert e.value.code == "invalid_request" and "'a'" in str(e.value)
    assert len(s.waiting) == 1 and s.by_request["a"].seq_id == 0
    s.schedule(0)  # still refused while it runs
    with pytest.raises(AdmissionError):
        s.add(make_seq("a", 5, seq_id=1))
    s.finish(s.by_request["a"], "stop")
    s.add(make_seq("a", 5, seq_id=1))  # free again once the first one ended


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(AdmissionError) as e:
        make_sched().check_feasible(0, 4)
    assert e.value.code == "invalid_request"


# -- cancellation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
def test_cancel_mid_prefill_frees_blocks_at_once_and_ignores_late_results(tok: Tokenizer, depth: int) -> None:
    sim = Sim(tok, depth=depth, num_blocks=32, max_num_batched_tokens=8)
    seq = sim.submit(Req("a", prompt(40), max_tokens=4))
    other = sim.submit(Req("b", prompt(3, 9), max_tokens=30))
    while sim.launch():
        pass
    assert 0 < seq.num_computed < 40 and seq.status is SeqStatus.RUNNING
    held = len(sim.sched.blocks.block_table(seq.seq_id))
    free_before = sim.sched.blocks.num_free_blocks
    sim.cancel("a")
    steps_before_cancel = len(sim.log)
    assert seq.status is SeqStatus.FINISHED and seq.seq_id not in sim.sched.blocks
    assert sim.sched.blocks.num_free_blocks == free_before + held
    assert sim.outcomes["a"].reason == "cancelled"
    while sim.core.inflight:  # the steps that carried a's chunks come back: nothing happens to it
        sim.apply_oldest()
    assert sim.outcomes["a"].tokens == [] and seq.output_ids == []
    sim.finish_all()
    assert all(x.rid != "a" for e in sim.log[steps_before_cancel:] for x in e)
    assert sim.outcomes["b"].tokens == reference(sim.fn, Req("b", prompt(3, 9), max_tokens=30), 64)[0]
    assert other.finish_reason == "length"


def test_cancel_mid_decode_with_two_steps_in_flight(tok: Tokenizer) -> None:
    sim = Sim(tok, depth=2)
    req = Req("a", prompt(5), max_tokens=30)
    seq = sim.submit(req)
    for t in range(4):
        sim.tick(t)
    while sim.launch():
        pass
    assert len(sim.core.inflight) == 2 and len(seq.pending) == 2  # both in-flight steps sample for it
    got = list(sim.outcomes["a"].tokens)
    assert got == reference(sim.fn, req, 64)[0][: len(got)] and len(got) >= 3
    sim.cancel("a")
    assert seq.seq_id not in sim.sched.blocks and sim.sched.blocks.num_free_blocks == 256
    assert not seq.pending
    sim.cancel("a")  # a second cancel (client retry) changes nothing
    while sim.core.inflight:
        sim.apply_oldest()
    assert sim.discarded == 2 and sim.outcomes["a"].tokens == got
    assert sim.sched.schedule(sim.step) is None
    sim.check_drained()
    assert (sim.outcomes["a"].reason, sim.outcomes["a"].ends) == ("cancelled", 1)


def test_cancel_while_waiting(tok: Tokenizer) -> None:
    sim = Sim(tok, depth=2, max_num_seqs=1)
    sim.submit(Req("a", prompt(5), max_tokens=5))
    sim.submit(Req("b", prompt(5, 1), max_tokens=5))
    sim.tick(0)
    assert sim.seqs["b"].status is SeqStatus.WAITING
    sim.cancel("b")
    assert not sim.sched.waiting and "b" not in sim.sched.by_request
    sim.finish_all(first_tick=1)
    assert sim.outcomes["b"].tokens == [] and sim.outcomes["a"].reason == "length"


# -- prefix caching --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
def test_same_long_prompt_hits_the_prefix_cache(tok: Tokenizer, depth: int) -> None:
    p = prompt(26)
    reqs = [Req("first", p, max_tokens=6, seed=3), Req("second", p, max_tokens=6, seed=3, arrival=12)]
    sim = Sim(tok, depth=depth, max_num_batched_tokens=8).run(reqs)
    first, second = sim.outcomes["first"], sim.outcomes["second"]
    assert first.num_cached == 0
    assert second.num_cached == (26 - 1) // 4 * 4  # every full block but the one with the last token
    assert second.tokens == first.tokens == reference(sim.fn, reqs[0], 64)[0]
    fed = sum(x.n for e in sim.log for x in e if x.rid == "second")
    assert fed == 26 - second.num_cached + 5  # only the uncached tail and the decode inputs ran
    off = Sim(tok, depth=depth, max_num_batched_tokens=8, prefix_caching=False).run(reqs)
    assert off.outcomes["second"].num_cached == 0 and off.outcomes["second"].tokens == second.tokens


def test_prefix_hits_only_blocks_already_committed(tok: Tokenizer) -> None:
    """A request arriving mid-way through another's chunked prefill reuses what is written so far."""
    p = prompt(42)
    reqs = [Req("first", p, max_tokens=3, seed=1), Req("second", p, max_tokens=3, seed=2, arrival=1)]
    sim = Sim(tok, depth=2, max_num_batched_tokens=16).run(reqs)
    # steps 0 and 1 carry first's tokens 0..31; step 2 its last 10 and, with the budget left,
    # second's start. Only the 8 blocks of steps 0-1 are committed when step 2 is built.
    assert [[(x.rid, x.start, x.n) for x in e] for e in sim.log[:3]] == [
        [("first", 0, 16)],
        [("first", 16, 16)],
        [("first", 32, 10), ("second", 32, 6)],
    ]
    assert sim.outcomes["second"].num_cached == 32
    for r in reqs:
        assert sim.outcomes[r.rid].tokens == reference(sim.fn, r, 64)[0]
    # the same prompt in the same step cannot hit: nothing of it is computed yet
    same = Sim(tok, depth=2, max_num_batched_tokens=64).run([reqs[0], Req("second", p, max_tokens=3, seed=2)])
    assert same.outcomes["second"].num_cached == 0


# -- random workloads ------------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[dict, list[Req], TokenFn]:
    bs = draw(st.sampled_from([2, 4]))
    ctx = draw(st.sampled_from([24, 40]))
    kw = dict(
        block_size=bs,
        context_length=ctx,
        max_num_seqs=draw(st.integers(1, 4)),
        max_num_batched_tokens=draw(st.integers(3, 20)),
        # from half the context to twice it: preemption is common, refusal for size happens
        num_blocks=draw(st.integers(ctx // bs // 2, 2 * ctx // bs)),
        prefix_caching=draw(st.booleans()),
        max_queue=draw(st.integers(2, 8)),
    )
    bases = [prompt(ctx, 0), prompt(ctx, 50)]  # shared prefixes exercise the prefix cache
    reqs = []
    for i in range(draw(st.integers(1, 7))):
        n = draw(st.integers(1, ctx - 1))
        cancel = draw(st.none() | st.integers(0, 25))
        reqs.append(
            Req(
                f"r{i}",
                draw(st.sampled_from(bases))[:n],
                max_tokens=draw(st.none() | st.integers(1, 12)),
                arrival=draw(st.integers(0, 8)),
                cancel_at=cancel,
                seed=draw(st.integers(0, 3)),
                ignore_eos=draw(st.booleans()),
            )
        )
    return kw, reqs, TokenFn(draw(st.sampled_from([0, 6])))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_every_invariant(tok: Tokenizer, w: tuple[dict, list[Req], TokenFn]) -> None:
    kw, reqs, fn = w
    sims = [Sim(tok, fn, depth=d, **kw).run(reqs) for d in (1, 2)]  # invariants checked every tick
    pool = kw["num_blocks"] * kw["block_size"]
    ctx = kw["context_length"]
    for sim in sims:
        for r in reqs:
            n = len(r.prompt)
            if r.max_tokens is None:
                feasible = n < ctx and n + 1 <= pool
                # without max_tokens the KV pool, when smaller than the context, is the limit
                limited = dataclasses.replace(r, max_tokens=max(1, min(ctx, pool) - n))
            else:
                feasible = n + r.max_tokens <= min(ctx, pool)
                limited = r
            if r.rid in sim.rejected:
                code = sim.rejected[r.rid].code
                assert code == ("busy" if feasible else "context_length"), (r, sim.rejected[r.rid])
                continue
            assert feasible, r
            o = sim.outcomes[r.rid]
            want, reason = reference(fn, limited, ctx)
            if o.reason == "cancelled":
                assert r.cancel_at is not None
                assert o.tokens == want[: len(o.tokens)]
            else:
                assert (o.tokens, o.reason) == (want, reason), r
    for sim in sims:  # what the run exercised (see --hypothesis-show-statistics)
        event(
            f"depth {sim.depth}: preempted"
            if sim.sched.num_preemptions
            else f"depth {sim.depth}: no preemption"
        )
        event("late results dropped" if sim.discarded else "no late results")
        event("cancelled" if any(o.reason == "cancelled" for o in sim.outcomes.values()) else "no cancel")
        for e in {e.code for e in sim.rejected.values()} or {"none"}:
            event(f"refused: {e}")
        event("prefix hit" if any(o.num_cached for o in sim.outcomes.values()) else "no prefix hit")
    # everything both modes accepted and let finish on its own came out the same
    sync, over = sims
    for r in reqs:
        a, b = sync.outcomes.get(r.rid), over.outcomes.get(r.rid)
        if a and b and "cancelled" not in (a.reason, b.reason):
            assert a.tokens == b.tokens and a.reason == b.reason
