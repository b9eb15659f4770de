"""Worker supervision and the engine's counters: start the GPU worker, watch it (liveness,
progress), fail what it held and restart it when it dies or hangs, and answer stats queries.

Part of EngineCore (loop.py): a mixin whose state is EngineCore's.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from tandem.actors import ActorContext, ActorHandle, ActorSpec, ActorStartError
from tandem.config import EngineConfig, WorkerConfig
from tandem.messages import OutputBatch, Stats
from tandem.scheduler.block_manager import BlockManager
from tandem.scheduler.scheduler import Scheduler, SchedulerLimits
from tandem.scheduler.sequence import SeqStatus
from tandem.scheduler.watchdog import StepWatchdog

if TYPE_CHECKING:
    from tandem.scheduler.batch import Packer
    from tandem.scheduler.scheduler import ScheduledBatch
    from tandem.shm import RingSegment

log = logging.getLogger(__name__)


class WorkerSupervision:
    """EngineCore's worker side (a mixin: the state below is EngineCore's; it also calls
    EngineCore._send and ResultHandling._fail)."""

    ctx: ActorContext
    cfg: EngineConfig
    context_length: int
    ring: RingSegment
    bell_addr: str
    results_addr: str
    worker: ActorHandle | None
    memory_plan: dict
    restarts: int
    deaths: deque[float]
    watchdog: StepWatchdog
    last_result_time: float
    sched: Scheduler
    inflight: deque[tuple[ScheduledBatch, float]]
    free_slots: deque[int]
    packer: Packer
    step: int
    prompt_tokens_total: int
    generated_tokens_total: int
    step_ms_ewma: float
    idle_ms_ewma: float

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
            enforce_eager=cfg.enforce_eager,
            inject_fault=cfg.inject_fault,
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

    def _oldest_step_age(self, now: float) -> tuple[float, int] | None:
        """(seconds the oldest step in flight has been able to run, its batched tokens)."""
        if not self.inflight:
            return None
        batch, sent = self.inflight[0]
        return now - max(sent, self.last_result_time), batch.num_tokens

    def step_overdue_s(self) -> float:
        oldest = self._oldest_step_age(time.monotonic())
        return 0.0 if oldest is None else self.watchdog.overdue_s(*oldest)

    def _check_worker(self) -> None:
        assert self.worker is not None
        self.worker.handle_control()
        problem = self.worker.check()
        oldest = self._oldest_step_age(time.monotonic())
        if problem is None and oldest is not None and self.watchdog.hung(*oldest):
            age, tokens = oldest
            problem = (
                f"worker made no progress: a step of {tokens} tokens has run for {age:.1f} s "
                f"(step timeout {self.cfg.step_timeout:g} s past its expected duration)"
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
        self.packer.forget()  # the slots' rows are rewritten in full from here
        self.worker.stop(timeout=1.0)
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.cfg.worker_death_window:
            self.deaths.popleft()
        if len(self.deaths) >= self.cfg.max_worker_deaths:
            for seq in list(self.sched.waiting):
                self._fail(seq, "worker_died", problem, out)
            self._send(out)
            raise RuntimeError(
                f"giving up: the worker died {len(self.deaths)} times within "
                f"{self.cfg.worker_death_window:g} s; last: {problem}"
            )
        self._send(out)
        self.restarts += 1
        waiting = list(self.sched.waiting)
        log.warning(
            "restarting the worker (restart %d; %d deaths in the last %g s)",
            self.restarts,
            len(self.deaths),
            self.cfg.worker_death_window,
        )
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
            step_overdue_s=self.step_overdue_s(),
        )
