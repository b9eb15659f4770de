"""Scheduling policy: admission, continuous batching with chunked prefill, preemption.

Pure bookkeeping: it decides which tokens of which sequences run in the next step and keeps
the block manager in step with that decision. Packing into shared memory is batch.py's job,
turning sampled tokens into text and stops is output.py's.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.messages import ErrorCode
from tandem.scheduler.block_manager import BlockManager, NoFreeBlocksError
from tandem.scheduler.sequence import SeqStatus, Sequence
from tandem.validation import ContextError, fit_context

if TYPE_CHECKING:
    from tandem.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    """The engine settings the policy reads (tests give them directly, without a whole config)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_queue: int
    context_length: int  # resolved: the engine's, capped at the model's
    encoder: bool = False  # the model is an encoder: embeddings only, and they need no KV blocks
    embeds: bool = True  # ModelConfig.embeds: false for a file that declares no one-vector pooling

    @classmethod
    def from_engine(
        cls, cfg: EngineConfig, context_length: int, encoder: bool = False, embeds: bool = True
    ) -> SchedulerLimits:
        return cls(
            cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_queue, context_length, encoder, embeds
        )


class AdmissionError(Exception):
    """A request refused at the door; ``code`` is the RequestError code to send."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # position of the first token fed
    input_ids: list[int]  # negative: -(1 + row) of the previous step's sampled tokens
    sample: bool
    epoch: int


@dataclass
class ScheduledBatch:
    step: int
    items: list[ScheduledSeq]
    num_tokens: int
    embeds: list[ScheduledSeq] = field(default_factory=list)  # embedding items, in row order


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockManager) -> None:
        self.limits = limits
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_request: dict[str, Sequence] = {}
        self._free_worker_slots = list(range(limits.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    # -- admission -------------------------------------------------------------------
    def check_feasible(self, prompt_len: int, max_tokens: int | None) -> None:
        """Refuse now what could never run, instead of queueing it forever."""
        try:  # the front end's rule, once more: the ring's block tables hold the context, no more
            fit_context(prompt_len, max_tokens, self.limits.context_length)
        except ContextError as e:
            raise AdmissionError(e.code, str(e)) from None
        total = prompt_len + (max_tokens if max_tokens is not None else 1)
        pool = self.blocks.num_blocks * self.blocks.block_size
        if total > pool:
            raise AdmissionError(
                ErrorCode.CONTEXT_LENGTH,
                f"request needs {total} tokens of KV cache (prompt {prompt_len}) but the whole pool "
                f"holds {pool} tokens",
            )

    @property
    def max_embed_tokens(self) -> int:
        """The longest input an embedding takes: it runs whole in one step, within the context."""
        return min(self.limits.context_length, self.limits.max_num_batched_tokens)

    def check_embed_feasible(self, prompt_len: int) -> None:
        if not self.limits.embeds:
            raise AdmissionError(ErrorCode.INVALID_REQUEST, "this model does not support embeddings")
        if prompt_len < 1:
            raise AdmissionError(ErrorCode.INVALID_REQUEST, "the input is empty (0 tokens)")
        limit = self.max_embed_tokens
        if prompt_len > limit:
            raise AdmissionError(
                ErrorCode.CONTEXT_LENGTH,
                f"input is {prompt_len} tokens but an embedding input holds at most {limit} "
                f"(context {self.limits.context_length}, {self.limits.max_num_batched_tokens} tokens a step)",
            )
        pool = self.blocks.num_blocks * self.blocks.block_size
        if not self.limits.encoder and prompt_len > pool:
            raise AdmissionError(
                ErrorCode.CONTEXT_LENGTH,
                f"input needs {prompt_len} tokens of KV cache, the pool holds {pool}",
            )

    def add(self, seq: Sequence) -> None:
        # What can never run is refused as such, even when the queue is also full.
        if seq.embed:
            self.check_embed_feasible(seq.prompt_len)
        elif self.limits.encoder:
            raise AdmissionError(ErrorCode.INVALID_REQUEST, "this model does not support generate")
        else:
            self.check_feasible(seq.prompt_len, seq.params.max_tokens)
        if len(self.waiting) >= self.limits.max_queue:
            raise AdmissionError(
                ErrorCode.BUSY,
                f"server busy: {len(self.waiting)} requests queued (max {self.limits.max_queue})",
            )
        if seq.request_id in self.by_request:
            raise AdmissionError(
                ErrorCode.INVALID_REQUEST, f"request id {seq.request_id!r} is already in use"
            )
        # No sequence can outgrow the whole KV pool: one without max_tokens (resolved to the rest
        # of the context, which may be larger) would fill it, preempt itself, and then wait forever
        # for blocks. It ends with "length" at the pool's size instead, as check_feasible assumes.
        pool = self.blocks.num_blocks * self.blocks.block_size
        seq.max_tokens = 0 if seq.embed else min(seq.max_tokens, pool - seq.prompt_len)
        self.waiting.append(seq)
        self.by_request[seq.request_id] = seq

    # -- leaving -----------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Free everything the sequence holds. Safe while steps that include it are in flight:
        the worker runs steps in order, so a later step reusing its blocks writes after them."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.pending.clear()
        self.by_request.pop(seq.request_id, None)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        if seq.worker_slot >= 0:
            self._free_worker_slots.append(seq.worker_slot)
            seq.worker_slot = -1

    def requeue(self, seq: Sequence) -> None:
        """Drop a running sequence's KV and put it at the front of the queue with its tokens, to
        be recomputed: preemption, and replay after a worker loss."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.pending.clear()  # a token still in flight is re-sampled identically (same seed, step)
        seq.epoch += 1
        seq.packed_params = None  # its grammar_key names the epoch
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption, for lack of KV blocks."""
        self.requeue(seq)
        self.num_preemptions += 1
        log.info("preempted %s (%d tokens) for lack of KV blocks", seq.request_id, len(seq.token_ids))

    # -- the step ------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, n: int) -> bool:
        return self.blocks.ensure_slots(seq.seq_id, seq.num_computed + n)

    def _item(self, seq: Sequence, n: int, step: int, row: int, commits: list[Sequence]) -> ScheduledSeq:
        """The general case: a prefill chunk, or a decode that feeds more than one token."""
        start = seq.num_computed
        known = len(seq.token_ids)
        ids = seq.token_ids[start : min(start + n, known)]
        if start + n > known:  # feeding the token the previous step is still sampling
            pstep, prow = seq.pending[-1]
            assert pstep == step - 1 and start + n == known + 1, "reference to a step other than the last"
            ids.append(-(1 + prow))
        seq.num_computed += n
        sample = seq.num_computed == seq.num_tokens and not seq.embed
        if sample:
            seq.pending.append((step, row))
        if min(seq.num_computed, known) >= seq.next_commit and not seq.embed:
            commits.append(seq)
        return ScheduledSeq(seq, start, ids, sample, seq.epoch)

    def schedule(self, step: int) -> ScheduledBatch | None:
        budget = self.limits.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        commits: list[Sequence] = []  # sequences that may have filled a block: committed at the end
        running = self.running
        ensure_slots = self.blocks.ensure_slots
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            tids = seq.token_ids
            pending = seq.pending
            known = len(tids)
            num_pending = len(pending)
            nc = seq.num_computed
            feed = known + num_pending - nc  # Sequence.tokens_to_feed, inlined: this runs per sequence
            n = feed if feed < budget else budget
            # not Sequence.done_generating, inlined
            if n <= 0 or known - seq.prompt_len + num_pending >= seq.max_tokens:
                i += 1
                continue
            if not ensure_slots(seq.seq_id, nc + n):
                while not self._reserve(seq, n):
                    victim = running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    break  # it preempted itself: everything after it is gone too
            if feed == 1:  # the decode step: one token, sampled; what _item does, without slices
                if nc < known:
                    ids = [tids[nc]]
                else:  # the token the previous step is still sampling
                    pstep, prow = pending[-1]
                    assert pstep == step - 1, "reference to a step other than the last"
                    ids = [-1 - prow]
                seq.num_computed = nc + 1
                pending.append((step, len(items)))
                if (nc + 1 if nc < known else known) >= seq.next_commit:
                    commits.append(seq)
                items.append(ScheduledSeq(seq, nc, ids, True, seq.epoch))
            else:
                items.append(self._item(seq, n, step, len(items), commits))
            budget -= n
            i += 1

        embeds: list[ScheduledSeq] = []
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if seq.embed and seq.prompt_len > budget:
                break  # it runs whole: in a later step (first come, first served)
            try:
                if seq.embed and self.limits.encoder:
                    cached = 0  # an encoder keeps no KV: nothing to allocate
                else:
                    cached = self.blocks.allocate(seq.seq_id, seq.token_ids, _cache_key(seq))
            except NoFreeBlocksError:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.num_computed = cached
            seq.next_commit = 0
            if seq.epoch == 0:
                seq.num_cached = cached
            seq.worker_slot = self._free_worker_slots.pop()
            self.running.append(seq)
            n = min(seq.tokens_to_feed, budget)
            items.append(self._item(seq, n, step, len(items), commits))
            if seq.embed:
                embeds.append(items[-1])
            budget -= n

        if not items:
            return None
        # After every allocation of the step (block_manager.py's contract, point 3).
        if self.blocks.enable_prefix_caching:
            commit = self.blocks.commit_full_blocks
            bs = self.blocks.block_size
            for seq in commits:
                num_hashed = commit(seq.seq_id, seq.token_ids, min(seq.num_computed, len(seq.token_ids)))
                seq.next_commit = (num_hashed + 1) * bs
        return ScheduledBatch(step, items, self.limits.max_num_batched_tokens - budget, embeds)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(not s.done_generating for s in self.running)


def _cache_key(seq: Sequence) -> bytes:
    """Penalized requests get a private prefix cache: the worker keeps their penalty state by
    seeing every token fed from position 0, which a prefix hit would skip. Constrained ones share
    the cache on first admission (a hit then skips prompt tokens only, which their matcher never
    reads) but not on a recompute, whose hits could skip generated tokens the matcher must replay:
    a new key per epoch there. Echo requests (prompt_logprobs) get one per epoch always: a hit
    would skip prompt positions whose logprobs they must compute, and after a preemption even
    their own blocks may hold positions whose results were dropped as stale."""
    if seq.embed:  # its blocks are never shared: no hit, and (not committed) never a cache entry
        return f"embed:{seq.seq_id}".encode()
    p = seq.params
    if (seq.grammar_id and seq.epoch) or p.prompt_logprobs is not None:
        return f"private:{seq.seq_id}:{seq.epoch}".encode()
    if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
        return f"private:{seq.seq_id}".encode()
    return b""
