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

import numpy as np
import zmq

from tandem.actors import ActorContext, ActorHandle, ActorSpec, ActorStartError
from tandem.actors.sockets import ipc_address, make_socket, remove_ipc_file
from tandem.config import EngineConfig, WorkerConfig
from tandem.messages import (
    CancelRequest,
    Finished,
    OutputBatch,
    RequestError,
    Stats,
    StatsRequest,
    StepResult,
    Stop,
    SubmitRequest,
    TokenDelta,
    decode,
    encode,
)
from tandem.models.gguf_file import GGUFFile
from tandem.models.tokenizer import Tokenizer
from tandem.scheduler.batch import pack_batch
from tandem.scheduler.block_manager import BlockManager
from tandem.scheduler.output import OutputProcessor
from tandem.scheduler.scheduler import AdmissionError, ScheduledBatch, Scheduler, SchedulerLimits
from tandem.scheduler.sequence import SeqStatus, Sequence
from tandem.shm import RingSegment, batch_layout, cleanup_stale_segments

log = logging.getLogger(__name__)


@dataclass
class SchedulerBoot:
    engine: EngineConfig
    request_endpoint: str  # the gateway's PUSH, bound by the gateway
    output_endpoint: str  # the gateway's PULL, bound by the gateway


def model_context_length(path: str) -> int:
    """The model's context from its metadata, read without torch."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        import json

        cfg = json.loads((p / "config.json").read_text())
        return int(cfg.get("max_position_embeddings", 2048))
    meta = GGUFFile(p).metadata
    arch = meta.get("general.architecture", "llama")
    return int(meta.get(f"{arch}.context_length", 2048))


def load_tokenizer(path: str) -> Tokenizer:
    from pathlib import Path

    p = Path(path)
    return Tokenizer.from_hf_dir(p) if p.is_dir() else Tokenizer.from_gguf(p)


class EngineCore:
    def __init__(self, ctx: ActorContext, boot: SchedulerBoot) -> None:
        self.ctx = ctx
        self.cfg = cfg = boot.engine
        self.tokenizer = load_tokenizer(cfg.model_path)
        model_ctx = model_context_length(cfg.model_path)
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
        self._start_worker()
        self.sched = self._new_scheduler()
        self.out = OutputProcessor(self.tokenizer, self.context_length)
        self.inflight: deque[tuple[ScheduledBatch, float]] = deque()
        self.free_slots: deque[int] = deque(range(cfg.ring_depth))
        self.step = 0
        self.seq_ids = count()
        self.draining = False
        # stats
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        self.step_ms_ewma = 0.0
        self.idle_ms_ewma = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    def _close_sockets(self) -> None:
        for s in (self.bells, self.results, self.inbox, self.outbox):
            s.close()
        remove_ipc_file(self.bell_addr)
        remove_ipc_file(self.results_addr)

    def _start_worker(self) -> None:
        cfg = self.cfg
        wcfg = WorkerConfig(
            model_path=cfg.model_path,
            device=cfg.device,
            dtype=cfg.dtype,
            kv_cache_memory=cfg.kv_cache_memory,
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            context_length=self.context_length,
            ring=self.ring.handle(),
            doorbell_endpoint=self.bell_addr,
            results_endpoint=self.results_addr,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            threads=cfg.threads,
        )
        assert cfg.runtime_dir is not None
        spec = ActorSpec(
            "worker", "tandem.gpu_worker.loop:worker_main", wcfg, cfg.runtime_dir, log_level=cfg.log_level
        )
        self.worker = ActorHandle.start(spec, self.ctx.zmq_ctx)
        self.memory_plan = dict(self.worker.ready.info.get("memory_plan", {}))
        self.memory_plan["worker_pid"] = self.worker.pid

    def _new_scheduler(self) -> Scheduler:
        limits = SchedulerLimits(
            max_num_seqs=self.cfg.max_num_seqs,
            max_num_batched_tokens=self.cfg.max_num_batched_tokens,
            max_queue=self.cfg.max_queue,
            context_length=self.context_length,
        )
        blocks = BlockManager(
            int(self.memory_plan["kv_blocks"]), self.cfg.block_size, self.cfg.enable_prefix_caching
        )
        return Scheduler(limits, blocks)

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
        else:
            log.warning("ignoring unexpected message %s", type(msg).__name__)

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
            n = len(req.prompt_token_ids)
            self.sched.check_feasible(n, req.params.max_tokens)
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
            self.sched.add(seq)
        except AdmissionError as e:
            out.errors.append(RequestError(req.request_id, e.code, str(e)))
        except ValueError as e:  # InvalidParameterError and friends
            out.errors.append(RequestError(req.request_id, "invalid_request", str(e)))

    # -- the pipeline --------------------------------------------------------------------
    def _max_inflight(self) -> int:
        return 2 if self.cfg.overlap else 1

    def _try_launch(self) -> bool:
        if len(self.inflight) >= self._max_inflight() or not self.free_slots:
            return False
        batch = self.sched.schedule(self.step)
        if batch is None:
            return False
        slot_index = self.free_slots.popleft()
        tables = {it.seq.seq_id: self.sched.blocks.block_table(it.seq.seq_id) for it in batch.items}
        bell = pack_batch(batch, self.ring.slot(slot_index), slot_index, tables)
        self.bells.send(encode(bell))
        log.debug("step %d sent: %d seqs, %d tokens", batch.step, len(batch.items), batch.num_tokens)
        self.inflight.append((batch, time.monotonic()))
        self.step += 1
        for it in batch.items:
            if it.start == 0 and it.seq.admitted_time == 0.0:
                it.seq.admitted_time = time.monotonic()
        return True

    def _process_result(self, res: StepResult, out: OutputBatch) -> None:
        batch, sent = self.inflight.popleft()
        log.debug("step %d result: forward %.2f ms, idle %.2f ms", res.step, res.forward_ms, res.idle_ms)
        if res.step != batch.step:
            raise RuntimeError(f"worker answered step {res.step}, expected {batch.step}")
        self.free_slots.append(res.slot)
        elapsed = (time.monotonic() - sent) * 1000
        self.step_ms_ewma = 0.9 * self.step_ms_ewma + 0.1 * elapsed if self.step_ms_ewma else elapsed
        self.idle_ms_ewma = 0.9 * self.idle_ms_ewma + 0.1 * res.idle_ms
        sampled = [it for it in batch.items if it.sample]
        if res.error:
            for it in sampled:
                if it.seq.status is SeqStatus.RUNNING and it.seq.epoch == it.epoch:
                    self._fail(it.seq, "internal", f"step failed on the worker: {res.error}", out)
            return
        tokens = np.frombuffer(res.token_ids, dtype=np.int64)
        lps = np.frombuffer(res.logprobs, dtype=np.float32) if res.logprobs else None
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
        for k, it in enumerate(sampled):
            seq = it.seq
            if seq.status is not SeqStatus.RUNNING or seq.epoch != it.epoch:
                continue  # finished, cancelled or preempted since: the token is dropped
            pstep, _ = seq.pending.popleft()
            assert pstep == batch.step
            tok = int(tokens[k])
            seq.token_ids.append(tok)
            self.generated_tokens_total += 1
            if seq.first_token_time == 0.0:
                seq.first_token_time = now
                self.prompt_tokens_total += seq.prompt_len
            ev = self.out.on_token(seq, tok)
            delta = TokenDelta(seq.request_id, [tok], ev.text)
            p = seq.params
            if p.logprobs is not None and lps is not None:
                delta.logprobs = [float(lps[k])]
                if top_ids is not None and p.logprobs > 0:
                    delta.top_logprobs = [
                        [
                            [int(i), float(v)]
                            for i, v in zip(top_ids[k, : p.logprobs], top_lps[k, : p.logprobs], strict=True)
                        ]
                    ]
            if p.return_logits and logits is not None:
                delta.logits = [logits[k].tobytes()]
            out.deltas.append(delta)
            if ev.finish_reason:
                self._finish(seq, ev.finish_reason, ev.stop_reason, out)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None, out: OutputBatch) -> None:
        now = time.monotonic()
        self.sched.finish(seq, reason, stop_reason)
        self.out.release(seq)
        first = seq.first_token_time or now
        admitted = seq.admitted_time or now
        out.finished.append(
            Finished(
                request_id=seq.request_id,
                finish_reason=reason,
                prompt_tokens=seq.prompt_len,
                completion_tokens=len(seq.token_ids) - seq.prompt_len,
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

    # -- supervision ---------------------------------------------------------------------
    def _check_worker(self) -> None:
        assert self.worker is not None
        self.worker.handle_control()
        problem = self.worker.check()
        if problem is None and self.inflight:
            waited = time.monotonic() - self.inflight[0][1]
            if waited > self.cfg.step_timeout:
                problem = (
                    f"worker made no progress for {waited:.1f} s (step timeout {self.cfg.step_timeout} s)"
                )
                self.worker.kill()
        if problem is None:
            return
        log.error("%s", problem)
        out = OutputBatch()
        for seq in list(self.sched.running):
            self._fail(seq, "worker_died", problem, out)
        self.inflight.clear()
        self.free_slots = deque(range(self.cfg.ring_depth))
        self.worker.stop(timeout=1.0)
        if self.restarts >= self.cfg.max_worker_restarts:
            for seq in list(self.sched.waiting):
                self._fail(seq, "worker_died", problem, out)
            self._send(out)
            raise RuntimeError(f"giving up after {self.restarts} worker restarts: {problem}")
        self._send(out)
        self.restarts += 1
        waiting = list(self.sched.waiting)
        log.warning("restarting the worker (restart %d of %d)", self.restarts, self.cfg.max_worker_restarts)
        try:
            self._start_worker()
        except ActorStartError as e:
            out = OutputBatch()
            for seq in waiting:
                self._fail(seq, "worker_died", f"{problem}; restart failed: {e}", out)
            self._send(out)
            raise
        # The new worker's KV pool is empty: fresh block manager, waiting requests carried over.
        self.sched = self._new_scheduler()
        for seq in waiting:
            seq.status = SeqStatus.WAITING
            self.sched.waiting.append(seq)
            self.sched.by_request[seq.request_id] = seq

    def stats(self, query_id: int = 0) -> Stats:
        b = self.sched.blocks
        return Stats(
            query_id=query_id,
            worker_alive=self.worker is not None and self.worker.is_alive(),
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
            memory_plan=self.memory_plan,
            max_queue=self.cfg.max_queue,
            worker_restarts=self.restarts,
        )

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
                while True:
                    try:
                        frame = self.inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle_input(decode(frame), out)
            if self.results in events:
                while self.inflight:
                    try:
                        frame = self.results.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._process_result(decode(frame), out)
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
