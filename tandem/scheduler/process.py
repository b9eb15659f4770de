"""The scheduler process: EngineCore (core.py) behind ZeroMQ sockets, with the worker it supervises.

It owns what the core does not: the ring segment, the sockets to the gateway (requests in,
output frames out) and to the worker (doorbells out, results in), the worker process itself
(started, watched for liveness and progress, restarted when it dies or hangs), and the loop
that waits on all of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import zmq

from tandem.actors import ActorContext, ActorHandle, ActorSpec, ActorStartError
from tandem.actors.sockets import INTERNAL_HEARTBEAT, drain, ipc_address, make_socket, remove_ipc_file
from tandem.config import EngineConfig, WorkerConfig
from tandem.messages import (
    CancelRequest,
    EmbedRequest,
    ErrorCode,
    MessageError,
    OutputBatch,
    RequestError,
    Stats,
    StatsRequest,
    Stop,
    SubmitRequest,
    TraceRequest,
    encode,
)
from tandem.scheduler.core import EngineCore
from tandem.scheduler.step_trace import StepTracer, trace_reply
from tandem.shm import RingSegment, batch_layout, cleanup_stale_segments
from tandem.tokenizer.model_files import read_config_and_tokenizer
from tandem.validation import InvalidParameterError

log = logging.getLogger(__name__)

_CHECK_INTERVAL_S = 0.05  # how often the worker's health and progress are looked at
_DOORBELL_WAIT_MS = 10  # between tries of a doorbell the worker's socket cannot take yet


@dataclass
class SchedulerBoot:
    engine: EngineConfig
    request_endpoint: str  # the gateway's PUSH, bound by the gateway
    output_endpoint: str  # the gateway's PULL, bound by the gateway


class SchedulerProcess:
    def __init__(self, ctx: ActorContext, boot: SchedulerBoot) -> None:
        self.ctx = ctx
        self.cfg = cfg = boot.engine
        model_cfg, tokenizer = read_config_and_tokenizer(cfg.model_path)
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
        self.bells = make_socket(z, zmq.PUSH, linger_ms=0, heartbeat_ivl_ms=INTERNAL_HEARTBEAT)
        self.bells.bind(self.bell_addr)
        self.results = make_socket(z, zmq.PULL, linger_ms=0, heartbeat_ivl_ms=INTERNAL_HEARTBEAT)
        self.results.bind(self.results_addr)
        self.inbox = make_socket(z, zmq.PULL, linger_ms=0, heartbeat_ivl_ms=INTERNAL_HEARTBEAT)
        self.inbox.connect(boot.request_endpoint)
        self.outbox = make_socket(z, zmq.PUSH, linger_ms=2000, heartbeat_ivl_ms=INTERNAL_HEARTBEAT)
        self.outbox.connect(boot.output_endpoint)
        ctx.add_cleanup(self._close_sockets)

        self.worker: ActorHandle | None = None
        self.memory_plan: dict = {}
        self.restarts = 0
        self.deaths: deque[float] = deque()  # monotonic times of worker deaths, within the window
        self._start_worker()
        self.core = EngineCore(
            cfg,
            tokenizer,
            self.context_length,
            self.ring,
            int(self.memory_plan["kv_blocks"]),
            encoder=model_cfg.is_encoder,
            embeds=model_cfg.embeds,
        )
        self.draining = False
        self.tracer = StepTracer(cfg.trace_steps) if cfg.trace_steps else None  # serve --trace-steps

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
            "model": dict(self.worker.ready.info.get("model", {})) if self.worker is not None else {},
        }

    def _start_worker(self) -> None:
        cfg = self.cfg
        wcfg = WorkerConfig(
            engine=cfg,
            context_length=self.context_length,
            ring=self.ring.handle(),
            doorbell_endpoint=self.bell_addr,
            results_endpoint=self.results_addr,
        )
        assert cfg.runtime_dir is not None
        spec = ActorSpec(
            "worker", "tandem.gpu_worker.loop:worker_main", wcfg, cfg.runtime_dir, log_level=cfg.log_level
        )
        self.worker = ActorHandle.start(spec, self.ctx.zmq_ctx)
        self.memory_plan = dict(self.worker.ready.info.get("memory_plan", {}))
        self.memory_plan["worker_pid"] = self.worker.pid

    # -- the loop ------------------------------------------------------------------------
    def _send(self, batch: OutputBatch) -> None:
        if batch.deltas or batch.finished or batch.errors:
            self.outbox.send(encode(batch))

    def _handle_input(self, msg: object, out: OutputBatch) -> None:
        if isinstance(msg, SubmitRequest | EmbedRequest):
            self.core.add(msg, out)
        elif isinstance(msg, CancelRequest):
            self.core.cancel(msg.request_id, out)
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
            if isinstance(msg, SubmitRequest | EmbedRequest) and isinstance(rid, str):
                why = f"scheduler could not take the request: {type(e).__name__}: {e}"
                seq = self.core.sched.by_request.get(rid)
                if seq is not None:
                    self.core.fail(seq, ErrorCode.INTERNAL, why, out)
                else:
                    out.errors.append(RequestError(rid, ErrorCode.INTERNAL, why))

    def _refuse_unreadable(self, e: MessageError, out: OutputBatch) -> None:
        """A request frame that does not decode still gets its one terminal, when its id can be read
        (a buggy or hostile peer of the scheduler socket: the gateway sends only valid requests)."""
        rid = e.request_id
        if e.message_type is SubmitRequest and rid is not None and rid not in self.core.sched.by_request:
            why = str(InvalidParameterError(e.field, e.reason)) if e.field else str(e)
            out.errors.append(RequestError(rid, ErrorCode.INVALID_REQUEST, why))

    def _to_worker(self, data: bytes) -> bool:
        """Send to the worker's doorbell socket; False (the worker lost and restarted) if it has
        died or hung. A PUSH socket with no peer blocks its sender: a blocking send after the
        worker's death, before the periodic check had seen it, hung the scheduler and every request
        on it. It waits for a peer only until the worker connects (a fresh one) or is seen lost."""
        assert self.worker is not None
        while True:
            try:
                self.bells.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if self.worker.check() is not None or self.core.step_hung():
                    self._check_worker()  # restarts it, failing or replaying what it held
                    return False
                self.bells.poll(_DOORBELL_WAIT_MS, zmq.POLLOUT)

    def _launch(self) -> bool:
        out = OutputBatch()
        t_prep = time.monotonic_ns()
        bell = self.core.launch(out)
        t_packed = time.monotonic_ns()
        self._send(out)
        for msg in self.core.take_worker_msgs():  # grammars, ahead of the steps that use them
            if not self._to_worker(encode(msg)):
                return True
        if bell is None:
            return bool(out.errors)  # a dropped step: try the next one at once
        if not self._to_worker(encode(bell)):
            return True
        if self.tracer is not None:
            self.tracer.launched(self.core.inflight[-1].batch, t_prep, t_packed, time.monotonic_ns())
        log.debug("step %d sent: %d seqs, %d tokens", bell.step, bell.num_seqs, bell.num_tokens)
        return True

    def run(self) -> None:
        assert self.worker is not None
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        poller.register(self.ctx.inbox, zmq.POLLIN)
        last_check = 0.0
        while True:
            launched = self._launch()
            if self.draining and self.core.idle:
                break
            if self.ctx.stop_event.is_set() and not self.draining:
                self._begin_stop(Stop("stop event"))
                continue
            events = dict(poller.poll(0 if launched else 50))
            out = OutputBatch()
            if self.ctx.inbox in events:
                stop = self.ctx.poll_inbox()
                if stop is not None:
                    self._begin_stop(stop)
                    if not stop.drain:
                        break
            if self.inbox in events:

                def refuse(e: MessageError, out: OutputBatch = out) -> None:
                    self._refuse_unreadable(e, out)

                for msg in drain(self.inbox, "scheduler", refuse):
                    self._handle_input_safely(msg, out)
            if self.results in events:
                for msg in drain(self.results, "scheduler"):
                    t_result = time.monotonic_ns()
                    self.core.apply(msg, out)
                    if self.tracer is not None:
                        self.tracer.applied(msg, t_result, time.monotonic_ns())
            self._send(out)
            now = time.monotonic()
            if now - last_check > _CHECK_INTERVAL_S:
                last_check = now
                self._check_worker()
        self._shutdown()

    def _begin_stop(self, stop: Stop) -> None:
        self.draining = True
        self.core.admitting = False
        if stop.drain:
            s = self.core.sched
            log.info("draining %d running and %d waiting requests", len(s.running), len(s.waiting))

    def _shutdown(self) -> None:
        self._send(self.core.fail_all(ErrorCode.SHUTTING_DOWN, "server is shutting down"))
        if self.worker is not None:
            self.worker.stop(timeout=5.0)

    # -- supervision ---------------------------------------------------------------------
    def _check_worker(self) -> None:
        assert self.worker is not None
        self.worker.handle_control()
        problem = self.worker.check()
        if problem is None and self.core.step_hung():
            age, tokens = self.core.oldest_step_age() or (0.0, 0)
            problem = (
                f"worker made no progress: a step of {tokens} tokens has run for {age:.1f} s "
                f"(step timeout {self.cfg.step_timeout:g} s past its expected duration)"
            )
        if problem is None:
            return
        log.error("%s", problem)
        # Gone before its requests are answered: a worker that is only stopped (SIGSTOP), or
        # slow to exit, could otherwise wake and post results next to its successor's.
        self.worker.kill()
        self.worker.stop(timeout=1.0)
        self._send(self.core.worker_lost(problem))
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.cfg.worker_death_window:
            self.deaths.popleft()
        if len(self.deaths) >= self.cfg.max_worker_deaths:
            self._send(self.core.fail_all(ErrorCode.WORKER_DIED, problem))
            raise RuntimeError(
                f"giving up on model '{self.cfg.model_name or self.cfg.model_path}': the worker died "
                f"{len(self.deaths)} times within "
                f"{self.cfg.worker_death_window:g} s; last: {problem}"
            )
        self.restarts += 1
        log.warning(
            "restarting the worker (restart %d; %d deaths in the last %g s)",
            self.restarts,
            len(self.deaths),
            self.cfg.worker_death_window,
        )
        try:
            self._start_worker()
        except ActorStartError as e:
            self._send(self.core.fail_all(ErrorCode.WORKER_DIED, f"{problem}; restart failed: {e}"))
            raise
        self.core.worker_ready(int(self.memory_plan["kv_blocks"]))

    def stats(self, query_id: int = 0) -> Stats:
        return self.core.stats(
            query_id,
            worker_alive=self.worker is not None and self.worker.is_alive(),
            memory_plan=self.memory_plan,
            worker_restarts=self.restarts,
        )


def scheduler_main(ctx: ActorContext) -> None:
    boot: SchedulerBoot = ctx.config
    proc = SchedulerProcess(ctx, boot)
    ctx.send_ready(proc.ready_info())
    proc.run()
