"""Apply a step's results: sampled tokens onto their sequences, deltas and terminal frames out.

Part of EngineCore (loop.py), kept apart because it runs once per sequence per step and is
written for that: one `tolist()` per array instead of a numpy scalar per token, the output
processor's tuple-returning `advance`, attributes read once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from tandem.messages import Finished, OutputBatch, RequestError, StepResult, TokenDelta
from tandem.scheduler.sequence import SeqStatus, Sequence

if TYPE_CHECKING:
    from tandem.scheduler.output import OutputProcessor
    from tandem.scheduler.scheduler import ScheduledBatch, Scheduler
    from tandem.scheduler.watchdog import StepWatchdog

log = logging.getLogger(__name__)

_RUNNING = SeqStatus.RUNNING


class ResultHandling:
    """EngineCore's result side (a mixin: the state below is EngineCore's)."""

    sched: Scheduler
    out: OutputProcessor
    inflight: deque[tuple[ScheduledBatch, float]]
    free_slots: deque[int]
    prompt_tokens_total: int
    generated_tokens_total: int
    step_ms_ewma: float
    idle_ms_ewma: float
    watchdog: StepWatchdog
    last_result_time: float
    mean_completion_tokens: float

    def _process_result(self, res: StepResult, out: OutputBatch) -> None:
        if not self.inflight or res.step < self.inflight[0][0].step:
            # Steps are numbered across worker restarts: this one belongs to a worker that is gone.
            log.warning("dropping the result of step %d: not in flight (worker restarted?)", res.step)
            return
        batch, sent = self.inflight.popleft()
        log.debug("step %d result: forward %.2f ms, idle %.2f ms", res.step, res.forward_ms, res.idle_ms)
        if res.step != batch.step:
            raise RuntimeError(f"worker answered step {res.step}, expected {batch.step}")
        self.free_slots.append(res.slot)
        now = time.monotonic()
        # The time the step could run (the watchdog's own clock), not the worker's report of it.
        self.watchdog.observe(batch.num_tokens, (now - max(sent, self.last_result_time)) * 1000)
        self.last_result_time = now
        elapsed = (now - sent) * 1000
        self.step_ms_ewma = 0.9 * self.step_ms_ewma + 0.1 * elapsed if self.step_ms_ewma else elapsed
        self.idle_ms_ewma = 0.9 * self.idle_ms_ewma + 0.1 * res.idle_ms
        sampled = [it for it in batch.items if it.sample]
        if res.error:
            for it in sampled:
                if it.seq.status is _RUNNING and it.seq.epoch == it.epoch:
                    self._fail(it.seq, "internal", f"step failed on the worker: {res.error}", out)
            return
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
        now = time.monotonic()
        advance = self.out.advance
        deltas = out.deltas
        num_deltas = len(deltas)
        step = batch.step
        running = _RUNNING
        extras = lps is not None or logits is not None
        for k, it in enumerate(sampled):
            seq = it.seq
            if seq.status is not running or seq.epoch != it.epoch:
                continue  # finished, cancelled or preempted since: the token is dropped
            pstep, _ = seq.pending.popleft()
            assert pstep == step
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
                        delta.top_logprobs = [
                            [
                                [i, v]
                                for i, v in zip(top_ids[k, :n].tolist(), top_lps[k, :n].tolist(), strict=True)
                            ]
                        ]
                if p.return_logits and logits is not None:
                    delta.logits = [logits[k].tobytes()]
            deltas.append(delta)
            if finish_reason:
                self._finish(seq, finish_reason, stop_reason, out)
        self.generated_tokens_total += len(deltas) - num_deltas  # one delta per token taken

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None, out: OutputBatch) -> None:
        now = time.monotonic()
        self.sched.finish(seq, reason, stop_reason)
        self.out.release(seq)
        first = seq.first_token_time or now
        admitted = seq.admitted_time or now
        completion = len(seq.token_ids) - seq.prompt_len
        if reason != "cancelled":
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

    def _fail(self, seq: Sequence, code: str, message: str, out: OutputBatch) -> None:
        self.sched.finish(seq, "error")
        self.out.release(seq)
        out.errors.append(RequestError(seq.request_id, code, message))
