"""tandem's step trace (GET /api/trace of `serve --trace-steps N`) turned into per-run figures and
into a Chrome trace (JSON that Perfetto and chrome://tracing open).

Rows follow `tandem.messages.STEP_TRACE_FIELDS`; their times are `time.monotonic_ns()` of one
machine, a clock the scheduler and the worker share, so their spans line up on one timeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tandem.messages import STEP_TRACE_FIELDS

_I = {name: i for i, name in enumerate(STEP_TRACE_FIELDS)}


@dataclass(frozen=True)
class StepFigures:
    steps: int
    sched_ms_per_step: float  # scheduler prep (schedule, pack, doorbell) + applying the results
    worker_ms_per_step: float  # worker: doorbell read -> results ready on the host
    gpu_idle_frac: float | None  # share of the worker's span over the run it spent between steps


def _ms(ns: float) -> float:
    return ns / 1e6


def step_figures(rows: Sequence[Sequence[int]]) -> StepFigures | None:
    """Means over the steps of one run (None for a run with no complete step)."""
    rows = [r for r in rows if r[_I["worker_start_ns"]] and r[_I["worker_end_ns"]]]
    if not rows:
        return None
    prep = sum(r[_I["sent_ns"]] - r[_I["prep_start_ns"]] for r in rows)
    apply = sum(r[_I["result_end_ns"]] - r[_I["result_start_ns"]] for r in rows)
    busy = sum(r[_I["worker_end_ns"]] - r[_I["worker_start_ns"]] for r in rows)
    span = max(r[_I["worker_end_ns"]] for r in rows) - min(r[_I["worker_start_ns"]] for r in rows)
    n = len(rows)
    return StepFigures(
        steps=n,
        sched_ms_per_step=_ms((prep + apply) / n),
        worker_ms_per_step=_ms(busy / n),
        # One step has no gap to measure; from two on, the gaps between worker spans are idle time.
        gpu_idle_frac=max(0.0, 1.0 - busy / span) if n > 1 and span > 0 else None,
    )


def _span(name: str, pid: int, tid: int, start_ns: int, end_ns: int, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "cat": "step",
        "ph": "X",
        "pid": pid,
        "tid": tid,
        "ts": start_ns / 1000,
        "dur": max(end_ns - start_ns, 0) / 1000,
        "args": args,
    }


def _meta(pid: int, tid: int | None, kind: str, name: str) -> dict[str, Any]:
    ev: dict[str, Any] = {"name": kind, "ph": "M", "pid": pid, "args": {"name": name}}
    if tid is not None:
        ev["tid"] = tid
    return ev


@dataclass
class TracedServer:
    """The step rows one tandem server recorded, with the pids that label its two processes."""

    label: str  # "overlap", "sync"
    scheduler_pid: int
    worker_pid: int
    rows: list[list[int]]


def chrome_trace(servers: Sequence[TracedServer]) -> dict[str, Any]:
    """One timeline: per server a scheduler process (prep and results threads) and a worker process
    (compute), every step a span named by its number, so prep N+1 sits beside compute N."""
    events: list[dict[str, Any]] = []
    for s in servers:
        sp, wp = s.scheduler_pid, s.worker_pid
        events += [
            _meta(sp, None, "process_name", f"{s.label}: scheduler (pid {sp})"),
            _meta(sp, 1, "thread_name", "prep: schedule + pack + doorbell"),
            _meta(sp, 2, "thread_name", "results: tokens, detokenize, stops"),
            _meta(wp, None, "process_name", f"{s.label}: worker (pid {wp})"),
            _meta(wp, 1, "thread_name", "compute: forward + sample"),
        ]
        for r in s.rows:
            step = r[_I["step"]]
            args = {"step": step, "seqs": r[_I["num_seqs"]], "tokens": r[_I["num_tokens"]]}
            events.append(_span(f"prep {step}", sp, 1, r[_I["prep_start_ns"]], r[_I["sent_ns"]], args))
            if r[_I["worker_start_ns"]]:
                events.append(
                    _span(f"compute {step}", wp, 1, r[_I["worker_start_ns"]], r[_I["worker_end_ns"]], args)
                )
            events.append(
                _span(f"results {step}", sp, 2, r[_I["result_start_ns"]], r[_I["result_end_ns"]], args)
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}
