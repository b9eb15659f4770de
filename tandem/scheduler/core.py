"""The scheduler's inner loop, with no processes, sockets or clocks of its own to wait on.

`EngineCore` takes requests (`add`, `cancel`), packs the next step into a free ring slot
(`launch`), turns a step's results into the frames for the gateway (`apply`), and forgets what a
dead worker held (`worker_lost`). The scheduler process (process.py) wraps it in ZeroMQ sockets
and worker supervision; tests and the scheduler benchmark drive it directly, with a fake worker
that reads the same ring slots.

Overlap: up to two steps are in flight. Step N+1 is packed while the worker computes step N;
sequences still waiting for N's token feed a reference to it. With ``overlap=False`` one step is
in flight at a time.

Detokenization and stop strings live here, in the scheduler, not in the gateway: a stop string
is then found exactly (across token boundaries, with the text held back until it cannot be one),
and a finished request's KV blocks are freed in the very step its stop was seen, instead of after
a round trip to the gateway. The price is per-token string work on the scheduler's critical path;
at batch 256 the whole step's bookkeeping, detokenization included, costs about 0.65 ms of CPU
(`tandem bench --section scheduler`: schedule 0.22, pack 0.12, results and detokenization 0.30),
well under a step.

Result application runs once per sequence per step and is written for that: one `tolist()` per
array instead of a numpy scalar per token, the output processor's tuple-returning `advance`,
attributes read once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any, Protocol

import numpy as np

from tandem.config import EngineConfig
from tandem.messages import (
    Doorbell,
    Embedding,
    EmbedRequest,
    ErrorCode,
    Finished,
    FinishReason,
    GrammarRelease,
    GrammarSpec,
    OutputBatch,
    RequestError,
    SamplingParams,
    Stats,
    StepResult,
    SubmitRequest,
    TokenDelta,
)
from tandem.scheduler.batch import Packer
from tandem.scheduler.block_manager import BlockManager
from tandem.scheduler.output import OutputProcessor
from tandem.scheduler.scheduler import AdmissionError, ScheduledBatch, Scheduler, SchedulerLimits
from tandem.scheduler.sequence import SeqStatus, Sequence
from tandem.scheduler.watchdog import StepWatchdog
from tandem.shm.slot import SlotView
from tandem.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_RUNNING = SeqStatus.RUNNING
_EMBED_PARAMS = SamplingParams(temperature=0.0)  # nothing is sampled; greedy keeps the step's flags plain


class Ring(Protocol):
    def slot(self, k: int) -> SlotView: ...


@dataclass
class InFlight:
    batch: ScheduledBatch
    sent: float  # monotonic time its doorbell went out


class EngineCore:
    def __init__(
        self,
        cfg: EngineConfig,
        tokenizer: Tokenizer,
        context_length: int,
        ring: Ring,
        kv_blocks: int,
        clock: Callable[[], float] = time.monotonic,
        encoder: bool = False,
        embeds: bool = True,
    ) -> None:
        """``encoder``: the model only embeds (BERT), and its embeddings need no KV blocks;
        ``embeds``: false when it does not embed at all (ModelConfig.embeds)."""
        self.cfg = cfg
        self.encoder = encoder
        self.embeds = embeds
        self.context_length = context_length
        self.ring = ring
        self.clock = clock
        self.out = OutputProcessor(tokenizer, context_length)
        self.vocab_size = tokenizer.vocab_size
        self.sched = self._new_scheduler(kv_blocks)
        self.inflight: deque[InFlight] = deque()
        self.free_slots: deque[int] = deque(range(cfg.ring_depth))
        self.packer = Packer()
        self.watchdog = StepWatchdog(cfg.step_timeout)
        self.step = 0
        self.seq_ids = count()
        self.admitting = True
        self.last_result_time = 0.0
        # counters
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.mean_completion_tokens = 0.0  # running average over finished requests
        self.step_ms_ewma = 0.0
        self.idle_ms_ewma = 0.0
        # Grammars of live sequences: (kind, text) -> [worker id, sequences using it]. The worker
        # learns each one from a GrammarSpec in `worker_msgs`, which the process sends ahead of
        # the next doorbell (so compilation starts as soon as the request arrives).
        self.grammars: dict[tuple[str, str], list[int]] = {}
        self._grammar_by_id: dict[int, tuple[str, str]] = {}
        self._grammar_ids = count(1)
        self.worker_msgs: list[GrammarSpec | GrammarRelease] = []
        self.grammar_ms_total = 0.0
        self.grammar_rows_total = 0

    def _new_scheduler(self, kv_blocks: int) -> Scheduler:
        cfg = self.cfg
        limits = SchedulerLimits.from_engine(
            cfg, self.context_length, encoder=self.encoder, embeds=self.embeds
        )
        return Scheduler(limits, BlockManager(kv_blocks, cfg.block_size, cfg.enable_prefix_caching))

    @property
    def idle(self) -> bool:
        return not (self.inflight or self.sched.running or self.sched.waiting)

    # -- requests ------------------------------------------------------------------------
    def add(self, req: SubmitRequest | EmbedRequest, out: OutputBatch | None = None) -> OutputBatch:
        """Queue a request (generation or embedding), or append the error that refuses it."""
        out = OutputBatch() if out is None else out
        if not self.admitting:
            out.errors.append(
                RequestError(req.request_id, ErrorCode.SHUTTING_DOWN, "server is shutting down")
            )
            return out
        try:
            seq = self._sequence(req)
            # The front end checked the request (tandem/validation.py); these only keep a frame
            # that bypassed it from failing other requests' steps: what the ring and the model hold.
            self.packer.check_prompt(seq.token_ids, self.vocab_size)
            self.packer.check_params(seq, self.ring.slot(0))
            self.sched.add(seq)
            if seq.params.grammar_kind:
                seq.grammar_id = self._grammar_ref(seq.params.grammar_kind, seq.params.grammar)
                seq.packed_params = None  # check_params packed it before it had its grammar
        except AdmissionError as e:
            retry = self.queue_wait_s() if e.code == ErrorCode.BUSY else 0.0
            out.errors.append(RequestError(req.request_id, e.code, str(e), retry))
        except ValueError as e:  # values the ring or the model cannot hold
            out.errors.append(RequestError(req.request_id, ErrorCode.INVALID_REQUEST, str(e)))
        return out

    def _sequence(self, req: SubmitRequest | EmbedRequest) -> Sequence:
        if not isinstance(req.request_id, str) or not isinstance(req.prompt_token_ids, list):
            raise AdmissionError(ErrorCode.INVALID_REQUEST, "malformed request")
        embed = isinstance(req, EmbedRequest)
        params = _EMBED_PARAMS if embed else req.params
        n = len(req.prompt_token_ids)
        return Sequence(
            seq_id=next(self.seq_ids),
            request_id=req.request_id,
            prompt_len=n,
            token_ids=list(req.prompt_token_ids),
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(63),
            # max_tokens 0 (an echo of the prompt alone) samples one token, then drops it
            max_tokens=params.max_tokens or (1 if params.max_tokens == 0 else self.context_length - n),
            arrival_time=req.arrival_time or self.clock(),
            embed=embed,
        )

    def _grammar_ref(self, kind: str, text: str) -> int:
        key = (kind, text)
        entry = self.grammars.get(key)
        if entry is None:
            entry = self.grammars[key] = [next(self._grammar_ids), 0]
            self._grammar_by_id[entry[0]] = key
            self.worker_msgs.append(GrammarSpec(entry[0], kind, text))
        entry[1] += 1
        return entry[0]

    def _grammar_unref(self, seq: Sequence) -> None:
        """After the sequence's last step was sent: the worker runs steps in order, so the
        release reaches it after every step that used the grammar."""
        gid, seq.grammar_id = seq.grammar_id, 0
        key = self._grammar_by_id.get(gid)
        if key is None:
            return
        entry = self.grammars[key]
        entry[1] -= 1
        if entry[1] <= 0:
            del self.grammars[key], self._grammar_by_id[gid]
            self.worker_msgs.append(GrammarRelease(gid))

    def take_worker_msgs(self) -> list[GrammarSpec | GrammarRelease]:
        msgs, self.worker_msgs = self.worker_msgs, []
        return msgs

    def cancel(self, request_id: str, out: OutputBatch | None = None) -> OutputBatch:
        out = OutputBatch() if out is None else out
        seq = self.sched.by_request.get(request_id)
        if seq is not None:  # a cancel for a request that already ended is a no-op
            self._finish(seq, FinishReason.CANCELLED, None, out)
        return out

    def fail(self, seq: Sequence, code: str, message: str, out: OutputBatch) -> None:
        self.sched.finish(seq, "error")
        self.out.release(seq)
        self._grammar_unref(seq)
        out.errors.append(RequestError(seq.request_id, code, message))

    def fail_all(self, code: str, message: str, out: OutputBatch | None = None) -> OutputBatch:
        out = OutputBatch() if out is None else out
        for seq in [*self.sched.running, *self.sched.waiting]:
            self.fail(seq, code, message, out)
        return out

    def queue_wait_s(self) -> float:
        """Seconds until the full queue has room again. A queued request leaves the queue when
        it is admitted, which (the batch being full) happens when a running request finishes:
        the soonest of those is expected after its remaining tokens at the rate it has been
        generating so far (the measured step time, before it has a few tokens). A request that
        may stop at EOS is expected to end near the mean length of recent replies (or, past it,
        within a quarter of it more)."""
        step_s = (self.watchdog.ms_per_step or 50.0) / 1000
        running = self.sched.running
        if len(running) < self.cfg.max_num_seqs:
            return step_s  # the batch has room: the queue moves as soon as KV blocks free up
        mean = self.mean_completion_tokens
        now = self.clock()

        def seconds_left(seq: Sequence) -> float:
            left = float(seq.max_tokens - seq.num_outputs)
            if not seq.params.ignore_eos and mean > 0:
                left = min(left, max(mean - seq.num_outputs, mean / 4))
            produced = len(seq.token_ids) - seq.prompt_len
            per_token = (now - seq.first_token_time) / produced if produced >= 8 else step_s
            return max(1.0, left) * per_token

        return min(map(seconds_left, running))

    # -- the pipeline --------------------------------------------------------------------
    def launch(self, out: OutputBatch | None = None) -> Doorbell | None:
        """Pack the next step into a free slot and return the doorbell that hands it to the
        worker; None when nothing can run now (steps in flight at the limit, or no work).
        A step that cannot be packed fails its requests into ``out``."""
        if len(self.inflight) >= (2 if self.cfg.overlap else 1) or not self.free_slots:
            return None
        batch = self.sched.schedule(self.step)
        if batch is None:
            return None
        slot_index = self.free_slots[0]
        try:
            bell = self.packer.pack(
                batch, self.ring.slot(slot_index), slot_index, self.sched.blocks.block_tables()
            )
        except Exception as e:
            self._drop_unpackable(batch, e, OutputBatch() if out is None else out)
            return None
        self.free_slots.popleft()
        now = self.clock()
        self.inflight.append(InFlight(batch, now))
        self.step += 1
        for it in batch.items:
            if it.seq.admitted_time == 0.0:  # its first chunk, cache hit or not
                it.seq.admitted_time = now
        return bell

    def _drop_unpackable(self, batch: ScheduledBatch, error: Exception, out: OutputBatch) -> None:
        """Admission checks make this a bug, not a request's fault: fail the step's requests and
        go on. The step never runs, so the prefix-cache entries it committed would name KV that
        is never written: forget them all."""
        log.exception("could not pack step %d; failing its %d requests", batch.step, len(batch.items))
        why = f"the scheduler could not pack the step: {type(error).__name__}: {error}"
        for it in batch.items:
            self.fail(it.seq, ErrorCode.INTERNAL, why, out)
        self.sched.blocks.reset_prefix_cache()
        self.packer.forget()

    def apply(self, res: StepResult, out: OutputBatch | None = None) -> OutputBatch:
        """The oldest step's results: tokens onto their sequences, deltas and terminal frames out."""
        out = OutputBatch() if out is None else out
        if not self.inflight or res.step < self.inflight[0].batch.step:
            # Steps are numbered across worker restarts: this one belongs to a worker that is gone.
            log.warning("dropping the result of step %d: not in flight (worker restarted?)", res.step)
            return out
        flight = self.inflight.popleft()
        batch = flight.batch
        if res.step != batch.step:
            raise RuntimeError(f"worker answered step {res.step}, expected {batch.step}")
        self.free_slots.append(res.slot)
        now = self.clock()
        # The time the step could run (the watchdog's clock), not the worker's report of it.
        self.watchdog.observe(batch.num_tokens, (now - max(flight.sent, self.last_result_time)) * 1000)
        self.last_result_time = now
        elapsed = (now - flight.sent) * 1000
        self.step_ms_ewma = 0.9 * self.step_ms_ewma + 0.1 * elapsed if self.step_ms_ewma else elapsed
        self.idle_ms_ewma = 0.9 * self.idle_ms_ewma + 0.1 * res.idle_ms
        self.grammar_ms_total += res.grammar_ms
        self.grammar_rows_total += res.grammar_rows
        sampled = [it for it in batch.items if it.sample]
        if res.error:
            for it in [*sampled, *batch.embeds]:
                if it.seq.status is _RUNNING and it.seq.epoch == it.epoch:
                    self.fail(it.seq, ErrorCode.INTERNAL, f"step failed on the worker: {res.error}", out)
            return out
        if res.num_prompt_lps:
            self._take_prompt_logprobs(res, batch.items, out)
        self._take_tokens(res, batch.step, sampled, now, out)
        if batch.embeds:
            self._take_embeddings(res, batch.embeds, now, out)
        return out

    def _take_embeddings(self, res: StepResult, embeds: list[Any], now: float, out: OutputBatch) -> None:
        dims = res.embed_dim
        vectors = np.frombuffer(res.embeddings, dtype=np.float32).reshape(-1, dims) if dims else None
        for k, it in enumerate(embeds):
            seq = it.seq
            if seq.status is not _RUNNING or seq.epoch != it.epoch:
                continue  # cancelled, or preempted since (it runs again)
            if vectors is None or k >= len(vectors):
                self.fail(seq, ErrorCode.INTERNAL, "the worker returned no embedding for the input", out)
                continue
            seq.first_token_time = now
            self.prompt_tokens_total += seq.prompt_len
            out.embeddings.append(Embedding(seq.request_id, vectors[k].astype("<f4").tobytes(), dims))
            self._finish(seq, FinishReason.STOP, None, out)

    def _take_prompt_logprobs(self, res: StepResult, items: list[Any], out: OutputBatch) -> None:
        """Echo rows' prompt logprobs, one delta per row: the worker returned one entry per prompt
        position p < prompt_len - 1 each such row fed, in row order (batch._write_targets)."""
        lps = np.frombuffer(res.prompt_lps, dtype=np.float32).tolist()
        top_ids = top_lps = None
        if res.prompt_top_k:
            top_ids = np.frombuffer(res.prompt_top_ids, dtype=np.int64).reshape(-1, res.prompt_top_k)
            top_lps = np.frombuffer(res.prompt_top_lps, dtype=np.float32).reshape(-1, res.prompt_top_k)
        offset = 0
        for it in items:
            seq = it.seq
            n_top = seq.params.prompt_logprobs
            if n_top is None:
                continue
            first, end = it.start, min(it.start + len(it.input_ids), seq.prompt_len - 1)
            if end <= first:
                continue
            lo, offset = offset, offset + end - first
            if seq.status is not _RUNNING or seq.epoch != it.epoch:
                continue
            skip = max(0, seq.prompt_lps_sent - first)  # sent before a preemption
            if skip >= end - first:
                continue
            delta = TokenDelta(seq.request_id, [], "", prompt_logprobs=lps[lo + skip : offset])
            if n_top and top_ids is not None and top_lps is not None:
                sel = slice(lo + skip, offset)
                rows = zip(top_ids[sel, :n_top], top_lps[sel, :n_top], strict=True)
                delta.prompt_top_logprobs = [
                    [[i, v] for i, v in zip(ids.tolist(), vals.tolist(), strict=True)] for ids, vals in rows
                ]
            seq.prompt_lps_sent = end
            out.deltas.append(delta)

    def _take_tokens(
        self, res: StepResult, step: int, sampled: list[Any], now: float, out: OutputBatch
    ) -> None:
        tokens = np.frombuffer(res.token_ids, dtype=np.int64).tolist()
        lps = np.frombuffer(res.logprobs, dtype=np.float32).tolist() if res.logprobs else None
        top_ids = top_lps = None
        if res.top_k:
            top_ids = np.frombuffer(res.top_ids, dtype=np.int64).reshape(-1, res.top_k)
            top_lps = np.frombuffer(res.top_logprobs, dtype=np.float32).reshape(-1, res.top_k)
        logits = (
            np.frombuffer(res.logits, dtype=np.float32).reshape(-1, res.vocab_size)
            if res.vocab_size
            else None
        )
        advance = self.out.advance
        deltas = out.deltas
        num_deltas = len(deltas)
        running = _RUNNING
        extras = lps is not None or logits is not None
        for k, it in enumerate(sampled):
            seq = it.seq
            if seq.status is not running or seq.epoch != it.epoch:
                continue  # finished, cancelled or preempted since: the token is dropped
            pstep, _ = seq.pending.popleft()
            assert pstep == step
            if seq.params.max_tokens == 0:  # echo of the prompt alone: its sampled token is not wanted
                seq.first_token_time = seq.first_token_time or now
                self.prompt_tokens_total += seq.prompt_len
                self._finish(seq, FinishReason.LENGTH, None, out)
                continue
            tok = tokens[k]
            seq.token_ids.append(tok)
            if seq.first_token_time == 0.0:
                seq.first_token_time = now
                self.prompt_tokens_total += seq.prompt_len
            text, finish_reason, stop_reason = advance(seq, tok)
            delta = TokenDelta(seq.request_id, [tok], text)
            if extras:
                p = seq.params
                if p.logprobs is not None and lps is not None:
                    delta.logprobs = [lps[k]]
                    if top_ids is not None and top_lps is not None and p.logprobs > 0:
                        n = p.logprobs
                        pairs = zip(top_ids[k, :n].tolist(), top_lps[k, :n].tolist(), strict=True)
                        delta.top_logprobs = [[[i, v] for i, v in pairs]]
                if p.return_logits and logits is not None:
                    delta.logits = [logits[k].tobytes()]
            deltas.append(delta)
            if finish_reason:
                self._finish(seq, finish_reason, stop_reason, out)
        self.generated_tokens_total += len(deltas) - num_deltas  # one delta per token taken

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None, out: OutputBatch) -> None:
        now = self.clock()
        self.sched.finish(seq, reason, stop_reason)
        self.out.release(seq)
        self._grammar_unref(seq)
        first = seq.first_token_time or now
        admitted = seq.admitted_time or now
        completion = len(seq.token_ids) - seq.prompt_len
        if reason != FinishReason.CANCELLED and not seq.embed:
            m = self.mean_completion_tokens
            self.mean_completion_tokens = completion if m == 0 else 0.8 * m + 0.2 * completion
        out.finished.append(
            Finished(
                request_id=seq.request_id,
                finish_reason=reason,
                prompt_tokens=seq.prompt_len,
                completion_tokens=completion,
                cached_tokens=seq.num_cached,
                stop_reason=stop_reason,
                queued_s=max(0.0, admitted - seq.arrival_time),
                prefill_s=max(0.0, first - admitted),
                decode_s=max(0.0, now - first),
            )
        )

    # -- the worker ----------------------------------------------------------------------
    def oldest_step_age(self) -> tuple[float, int] | None:
        """(seconds the oldest step in flight has been able to run, its batched tokens)."""
        if not self.inflight:
            return None
        oldest = self.inflight[0]
        return self.clock() - max(oldest.sent, self.last_result_time), oldest.batch.num_tokens

    def step_overdue_s(self) -> float:
        oldest = self.oldest_step_age()
        return 0.0 if oldest is None else self.watchdog.overdue_s(*oldest)

    def step_hung(self) -> bool:
        oldest = self.oldest_step_age()
        return oldest is not None and self.watchdog.hung(*oldest)

    def worker_lost(self, reason: str, out: OutputBatch | None = None) -> OutputBatch:
        """The worker died or hung: what it held is gone. Waiting requests stay queued for the
        next worker (`worker_ready`). A running request that has sent its client no token yet is
        replayed there from its prompt, invisibly to the client (greedy and seeded sampling give
        the same tokens); one that has streamed output fails, since its client saw part of a reply.
        A request is replayed once: lost a second time, it fails, so one that kills every worker
        it meets costs two workers, fewer than the deaths that stop the engine."""
        out = OutputBatch() if out is None else out
        for seq in list(reversed(self.sched.running)):  # requeued at the front, in their old order
            if len(seq.token_ids) == seq.prompt_len and seq.replays == 0:
                seq.replays += 1
                self.sched.requeue(seq)
                log.warning("replaying %s on the next worker (%s)", seq.request_id, reason)
            else:
                self.fail(seq, ErrorCode.WORKER_DIED, reason, out)
        self.inflight.clear()
        self.free_slots = deque(range(self.cfg.ring_depth))
        self.packer.forget()  # the slots' rows are rewritten in full from here
        return out

    def worker_ready(self, kv_blocks: int) -> None:
        """A new worker with an empty KV pool: a fresh block manager, the waiting queue kept."""
        waiting = list(self.sched.waiting)
        self.sched = self._new_scheduler(kv_blocks)
        # The new worker knows no grammar: every live one again, and nothing to release.
        self.worker_msgs = [GrammarSpec(gid, *key) for key, (gid, _) in self.grammars.items()]
        for seq in waiting:
            seq.status = SeqStatus.WAITING
            self.sched.waiting.append(seq)
            self.sched.by_request[seq.request_id] = seq

    def stats(self, query_id: int = 0, **shell: Any) -> Stats:
        """The counters; ``shell`` adds what only the process knows (worker_alive, memory_plan,
        worker_restarts)."""
        b = self.sched.blocks
        return Stats(
            query_id=query_id,
            worker_alive=shell.pop("worker_alive", True),
            waiting=len(self.sched.waiting),
            running=len(self.sched.running),
            kv_blocks_total=b.num_blocks,
            kv_blocks_used=b.num_blocks - b.num_free_blocks,
            kv_blocks_cached=b.num_cached_blocks,
            block_size=b.block_size,
            prefix_cache_hit_tokens=b.prefix_cache_hits,
            prefix_cache_query_tokens=b.prefix_cache_queries,
            steps=self.step,
            prompt_tokens_total=self.prompt_tokens_total,
            generated_tokens_total=self.generated_tokens_total,
            preemptions=self.sched.num_preemptions,
            overlap=self.cfg.overlap,
            step_time_ms_avg=self.step_ms_ewma,
            gpu_idle_ms_avg=self.idle_ms_ewma,
            max_queue=self.cfg.max_queue,
            step_overdue_s=self.step_overdue_s(),
            grammar_ms_total=self.grammar_ms_total,
            grammar_rows_total=self.grammar_rows_total,
            **shell,
        )
