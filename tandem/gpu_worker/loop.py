"""The GPU-worker process: wait for a doorbell, run the step, post the previous step's results.

On a GPU, results of step N are posted after step N+1 is launched when N+1's doorbell is
already waiting, so the device always has the next step queued while the host copies
results; when nothing is queued they are posted at once, so the scheduler never waits.
On the CPU each step's results are posted as soon as it is computed.
"""

from __future__ import annotations

import logging
import time

import zmq

from tandem.actors import ActorContext
from tandem.config import WorkerConfig
from tandem.gpu_worker.faults import FaultPlan
from tandem.gpu_worker.runner import ModelRunner, PendingResult
from tandem.messages import Doorbell, GrammarRelease, GrammarSpec, decode, encode
from tandem.shm import RingSegment

log = logging.getLogger(__name__)


def worker_main(ctx: ActorContext) -> None:
    cfg: WorkerConfig = ctx.config
    ring = RingSegment.from_handle(cfg.ring)
    ctx.add_cleanup(ring.close)
    runner = ModelRunner(cfg)
    ctx.add_cleanup(runner.grammar.close)
    runner.prepare_launch(enforce_eager=cfg.engine.enforce_eager)
    faults = FaultPlan(cfg.engine.inject_fault)
    bells = ctx.zmq_ctx.socket(zmq.PULL)
    bells.setsockopt(zmq.LINGER, 0)
    bells.connect(cfg.doorbell_endpoint)
    results = ctx.zmq_ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 1000)
    results.connect(cfg.results_endpoint)
    ctx.add_cleanup(lambda: (bells.close(0), results.close(0)))

    c = runner.config
    ctx.send_ready(
        {
            "memory_plan": runner.memory_plan(cfg.engine.max_num_batched_tokens),
            "model": {
                "architecture": c.architecture,
                "vocab_size": c.vocab_size,
                "num_layers": c.num_layers,
                "encoder": c.is_encoder,
                "embeds": runner.embeds,
                "embedding_length": c.hidden_size,
            },
        }
    )
    poller = zmq.Poller()
    poller.register(bells, zmq.POLLIN)
    poller.register(ctx.inbox, zmq.POLLIN)
    pending: PendingResult | None = None
    # On a GPU, launch returns before the step is done, so step N's results are copied and posted
    # while N+1 runs. On the CPU launch *is* the computation: holding N's results back until N+1
    # finished would keep the scheduler from preparing N+2 in the meantime.
    defer_results = runner.device.type == "cuda"
    last_done = time.perf_counter()
    started: dict[int, int] = {}  # step -> monotonic ns it was taken up (the scheduler's trace)

    def post(p: PendingResult) -> None:
        nonlocal last_done
        res = runner.finalize(p)
        res.t_start_ns, res.t_end_ns = started.pop(p.step, 0), time.monotonic_ns()
        results.send(encode(res))
        last_done = time.perf_counter()

    while not ctx.stop_event.is_set():
        if pending is not None and not bells.poll(0):
            post(pending)
            pending = None
        events = dict(poller.poll(100))
        if ctx.inbox in events and ctx.poll_inbox() is not None:
            break
        if bells not in events:
            continue
        bell = decode(bells.recv())
        if isinstance(bell, GrammarSpec):
            runner.grammar.register(bell.grammar_id, bell.kind, bell.text)
            continue
        if isinstance(bell, GrammarRelease):
            runner.grammar.release(bell.grammar_id)
            continue
        assert isinstance(bell, Doorbell), bell
        idle_ms = 0.0 if pending is not None else (time.perf_counter() - last_done) * 1000
        started[bell.step] = time.monotonic_ns()
        try:
            faults.before_step(bell.step)
            launched = runner.launch(ring.slot(bell.slot), bell, idle_ms)
        except Exception:
            # A forward that raised may have left the KV pool half written (and, on a GPU, the
            # context unusable): this worker is done. The step before it is complete, so its
            # results still go out; the exception itself reaches the scheduler as ActorFailed
            # (actors/runtime.py), which handles it as a death: streams that had output fail
            # naming it, the others are replayed on the next worker.
            log.exception("step %d failed; the worker exits", bell.step)
            if pending is not None:
                post(pending)
            raise
        if pending is not None:
            post(pending)
            pending = None
        if defer_results:
            pending = launched
        else:
            post(launched)
    if pending is not None:
        post(pending)
    log.info("worker stopping")
