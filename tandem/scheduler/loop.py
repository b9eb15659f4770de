"""The scheduler process: admit requests, run the step pipeline, stream results back.

Overlap (DESIGN.md section 2): up to two steps are in flight. Step N+1 is packed and rung
while the worker computes step N; sequences still waiting for N's token feed a reference to
it. With ``overlap=False`` the same code keeps one step in flight.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass
from itertools import count

import zmq

from tandem.actors import ActorContext, ActorHandle
from tandem.actors.sockets import drain, ipc_address, make_socket, remove_ipc_file
from tandem.config import EngineConfig
from tandem.messages import (
    CancelRequest,
    OutputBatch,
    RequestError,
    StatsRequest,
    Stop,
    SubmitRequest,
    TraceRequest,
    encode,
)
from tandem.models.model_files import read_config_and_tokenizer
from tandem.scheduler.batch import Packer
from tandem.scheduler.output import OutputProcessor
from tandem.scheduler.results import ResultHandling
from tandem.scheduler.scheduler import AdmissionError, ScheduledBatch
from tandem.scheduler.sequence import Sequence
from tandem.scheduler.step_trace import StepTracer, trace_reply
from tandem.scheduler.supervision import WorkerSupervision
from tandem.scheduler.watchdog import StepWatchdog
from tandem.shm import RingSegment, batch_layout, cleanup_stale_segments

log = logging.getLogger(__name__)


@dataclass
class SchedulerBoot:
    engine: EngineConfig
    request_endpoint: str  # the gateway's PUSH, bound by the gateway
    output_endpoint: str  # the gateway's PULL, bound by the gateway


class EngineCore(ResultHandling, WorkerSupervision):
    """The scheduler process's loop. Applying results is results.py's part of it, starting and
    watching the worker (and the stats) supervision.py's."""

    tracer: StepTracer | None = None  # serve --trace-steps

    def __init__(self, ctx: ActorContext, boot: SchedulerBoot) -> None:
        self.ctx = ctx
        self.cfg = cfg = boot.engine
        model_cfg, self.tokenizer = read_config_and_tokenizer(cfg.model_path)
        model_ctx = model_cfg.context_length
        self.context_length = min(cfg.context_length or model_ctx, model_ctx)
        cleanup_stale_segments()
        layout = batch_layout(
            cfg.max_num_batched_tokens,
            cfg.max_num_seqs,
            math.ceil(self.context_length / cfg.block_size),
            cfg.ring_depth,
        )
        self.ring = RingSegment.create(layout)
        ctx.add_cleanup(self.ring.unlink)
        z = ctx.zmq_ctx
        rt = cfg.runtime_dir
        assert rt is not None
        self.bell_addr = ipc_address(rt, "doorbell")
        self.results_addr = ipc_address(rt, "results")
        self.bells = make_socket(z, zmq.PUSH, linger_ms=0)
        self.bells.bind(self.bell_addr)
        self.results = make_socket(z, zmq.PULL, linger_ms=0)
        self.results.bind(self.results_addr)
        self.inbox = make_socket(z, zmq.PULL, linger_ms=0)
        self.inbox.connect(boot.request_endpoint)
        self.outbox = make_socket(z, zmq.PUSH, linger_ms=2000)
        self.outbox.connect(boot.output_endpoint)
        ctx.add_cleanup(self._close_sockets)

        self.worker: ActorHandle | None = None
        self.memory_plan: dict = {}
        self.restarts = 0
        self.deaths: deque[float] = deque()  # monotonic times of worker deaths, within the window
        self.watchdog = StepWatchdog(cfg.step_timeout)
        self.last_result_time = 0.0
        self._start_worker()
        self.sched = self._new_scheduler()
        self.out = OutputProcessor(self.tokenizer, self.context_length)
        self.inflight: deque[tuple[ScheduledBatch, float]] = deque()
        self.free_slots: deque[int] = deque(range(cfg.ring_depth))
        self.packer = Packer()
        self.step = 0
        self.seq_ids = count()
        self.draining = False
        # stats
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.mean_completion_tokens = 0.0  # running average over finished requests
        self.step_ms_ewma = 0.0
        self.idle_ms_ewma = 0.0
        if cfg.trace_steps:
            self.tracer = StepTracer(cfg.trace_steps)

    # -- lifecycle -----------------------------------------------------------------------
    def _close_sockets(self) -> None:
        for s in (self.bells, self.results, self.inbox, self.outbox):
            s.close()
        remove_ipc_file(self.bell_addr)
        remove_ipc_file(self.results_addr)

    def ready_info(self) -> dict:
        return {
            "memory_plan": self.memory_plan,
            "context_length": self.context_length,
            "max_num_seqs": self.cfg.max_num_seqs,
            "overlap": self.cfg.overlap,
            "worker_pid": self.worker.pid if self.worker is not None else None,
        }

    # -- inputs --------------------------------------------------------------------------
    def _send(self, batch: OutputBatch) -> None:
        if batch.deltas or batch.finished or batch.errors:
            self.outbox.send(encode(batch))

    def _handle_input(self, msg: object, out: OutputBatch) -> None:
        if isinstance(msg, SubmitRequest):
            self._admit(msg, out)
        elif isinstance(msg, CancelRequest):
            seq = self.sched.by_request.get(msg.request_id)
            if seq is not None:
                self._finish(seq, "cancelled", None, out)
        elif isinstance(msg, StatsRequest):
            self.outbox.send(encode(self.stats(msg.query_id)))
        elif isinstance(msg, TraceRequest):
            pid = self.worker.pid if self.worker is not None else None
            self.outbox.send(encode(trace_reply(self.tracer, msg.query_id, msg.since_step, pid)))
        else:
            log.warning("ignoring unexpected message %s", type(msg).__name__)

    def _handle_input_safely(self, msg: object, out: OutputBatch) -> None:
        """One request's data must never take the scheduler down: whatever it raises fails it."""
        try:
            self._handle_input(msg, out)
        except Exception as e:
            log.exception("failed to handle %s", type(msg).__name__)
            rid = getattr(msg, "request_id", None)
            if isinstance(msg, SubmitRequest) and isinstance(rid, str):
                why = f"scheduler could not take the request: {type(e).__name__}: {e}"
                seq = self.sched.by_request.get(rid)
                if seq is not None:
                    self._fail(seq, "internal", why, out)
                else:
                    out.errors.append(RequestError(rid, "internal", why))

    def _admit(self, req: SubmitRequest, out: OutputBatch) -> None:
        if self.draining:
            out.errors.append(RequestError(req.request_id, "shutting_down", "server is shutting down"))
            return
        try:
            req.params.validate()
            vocab = self.tokenizer.vocab_size
            bad = next((t for t in req.prompt_token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise AdmissionError(
                    "invalid_request", f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})"
                )
            if not isinstance(req.request_id, str) or not isinstance(req.prompt_token_ids, list):
                raise AdmissionError("invalid_request", "malformed request")
            n = len(req.prompt_token_ids)
            max_tokens = req.params.max_tokens or (self.context_length - n)
            seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
            seq = Sequence(
                seq_id=next(self.seq_ids),
                request_id=req.request_id,
                prompt_len=n,
                token_ids=list(req.prompt_token_ids),
                params=req.params,
                seed=seed,
                max_tokens=max_tokens,
            )
            self.packer.check_params(seq, self.ring.slot(0))
            self.sched.add(seq)
        except AdmissionError as e:
            retry = self.queue_wait_s() if e.code == "busy" else 0.0
            out.errors.append(RequestError(req.request_id, e.code, str(e), retry))
        except ValueError as e:  # InvalidParameterError and friends
            out.errors.append(RequestError(req.request_id, "invalid_request", str(e)))

    def queue_wait_s(self) -> float:
        """Seconds until the full queue has room again. A queued request leaves the queue when
        it is admitted, which (the batch being full) happens when a running request finishes:
        the soonest of those is expected after its remaining tokens times the measured step
        time. A request that may stop at EOS is expected to end near the mean length of recent
        replies (or, past it, within a quarter of it more)."""
        step_s = (self.watchdog.ms_per_step or 50.0) / 1000
        running = self.sched.running
        if len(running) < self.cfg.max_num_seqs:
            return step_s  # the batch has room: the queue moves as soon as KV blocks free up
        mean = self.mean_completion_tokens

        def tokens_left(seq: Sequence) -> float:
            left = float(seq.max_tokens - seq.num_outputs)
            if not seq.params.ignore_eos and mean > 0:
                left = min(left, max(mean - seq.num_outputs, mean / 4))
            return max(1.0, left)

        return min(map(tokens_left, running)) * step_s

    # -- the pipeline --------------------------------------------------------------------
    def _max_inflight(self) -> int:
        return 2 if self.cfg.overlap else 1

    def _try_launch(self) -> bool:
        if len(self.inflight) >= self._max_inflight() or not self.free_slots:
            return False
        t_prep = time.monotonic_ns()
        batch = self.sched.schedule(self.step)
        if batch is None:
            return False
        slot_index = self.free_slots[0]
        try:
            bell = self.packer.pack(
                batch, self.ring.slot(slot_index), slot_index, self.sched.blocks.block_tables()
            )
        except Exception as e:
            self._drop_unpackable(batch, e)
            return True
        self.free_slots.popleft()
        t_packed = time.monotonic_ns()
        self.bells.send(encode(bell))
        if self.tracer is not None:
            self.tracer.launched(batch, t_prep, t_packed, time.monotonic_ns())
        log.debug("step %d sent: %d seqs, %d tokens", batch.step, len(batch.items), batch.num_tokens)
        self.inflight.append((batch, time.monotonic()))
        self.step += 1
        for it in batch.items:
            if it.start == 0 and it.seq.admitted_time == 0.0:
                it.seq.admitted_time = time.monotonic()
        return True

    def _drop_unpackable(self, batch: ScheduledBatch, error: Exception) -> None:
        """A step that cannot be packed (admission checks make this a bug, not a request's fault)
        fails the requests in it and the loop goes on. The step never runs, so the prefix-cache
        entries it committed would name KV that is never written: forget them all."""
        log.exception("could not pack step %d; failing its %d requests", batch.step, len(batch.items))
        out = OutputBatch()
        why = f"the scheduler could not pack the step: {type(error).__name__}: {error}"
        for it in batch.items:
            self._fail(it.seq, "internal", why, out)
        self.sched.blocks.reset_prefix_cache()
        self.packer.forget()
        self._send(out)

    def run(self) -> None:
        assert self.worker is not None
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.ctx.inbox, zmq.POLLIN)
        last_check = 0.0
        while True:
            launched = self._try_launch()
            if self.draining and not self.sched.running and not self.sched.waiting and not self.inflight:
                break
            if self.ctx.stop_event.is_set() and not self.draining:
                self._begin_stop(Stop("stop event"))
                continue
            timeout = 0 if launched else 50
            events = dict(poller.poll(timeout))
            out = OutputBatch()
            if self.ctx.inbox in events:
                stop = self.ctx.poll_inbox()
                if stop is not None:
                    self._begin_stop(stop)
                    if not stop.drain:
                        break
            if self.inbox in events:
                for msg in drain(self.inbox, "scheduler"):
                    self._handle_input_safely(msg, out)
            if self.results in events:
                for msg in drain(self.results, "scheduler"):
                    t_result = time.monotonic_ns()
                    self._process_result(msg, out)
                    if self.tracer is not None:
                        self.tracer.applied(msg, t_result, time.monotonic_ns())
            self._send(out)
            now = time.monotonic()
            if now - last_check > 0.05:
                last_check = now
                self._check_worker()
        self._shutdown()

    def _begin_stop(self, stop: Stop) -> None:
        self.draining = True
        if not stop.drain:
            return
        log.info(
            "draining %d running and %d waiting requests", len(self.sched.running), len(self.sched.waiting)
        )

    def _shutdown(self) -> None:
        out = OutputBatch()
        for seq in list(self.sched.running) + list(self.sched.waiting):
            self._fail(seq, "shutting_down", "server is shutting down", out)
        self._send(out)
        if self.worker is not None:
            self.worker.stop(timeout=5.0)


def scheduler_main(ctx: ActorContext) -> None:
    boot: SchedulerBoot = ctx.config
    core = EngineCore(ctx, boot)
    ctx.send_ready(core.ready_info())
    core.run()
