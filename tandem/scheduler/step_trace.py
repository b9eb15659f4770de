"""Opt-in per-step timings (`serve --trace-steps N`): when each step was prepared, sent, computed
by the worker and applied, for a timeline of the pipeline (`tandem bench --trace`).

A step's row is opened when its doorbell goes out and closed when its result has been applied;
closed rows go to a ring of the last N. Tracing off costs the loop one `is None` test per launch
and per result, nothing else.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import TYPE_CHECKING

from tandem.messages import STEP_TRACE_FIELDS, StepResult, StepTrace

if TYPE_CHECKING:
    from tandem.scheduler.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

_ROW = len(STEP_TRACE_FIELDS)


class StepTracer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._open: dict[int, list[int]] = {}  # launched steps whose results are not applied yet
        self._done: deque[list[int]] = deque(maxlen=capacity)

    def launched(self, batch: ScheduledBatch, prep_start: int, prep_end: int, sent: int) -> None:
        row = [batch.step, len(batch.items), batch.num_tokens, prep_start, prep_end, sent]
        self._open[batch.step] = row + [0] * (_ROW - len(row))

    def applied(self, res: StepResult, start: int, end: int) -> None:
        row = self._open.pop(res.step, None)
        # Older open rows belong to steps a dead worker never answered: they will not close.
        for stale in [s for s in self._open if s < res.step]:
            del self._open[stale]
        if row is None:
            return
        row[6:] = [res.t_start_ns, res.t_end_ns, start, end]
        self._done.append(row)

    def since(self, step: int) -> list[list[int]]:
        return [row for row in self._done if row[0] >= step]


def trace_reply(
    tracer: StepTracer | None, query_id: int, since_step: int, worker_pid: int | None
) -> StepTrace:
    if tracer is None:
        return StepTrace(query_id, enabled=False)
    return StepTrace(
        query_id,
        enabled=True,
        capacity=tracer.capacity,
        scheduler_pid=os.getpid(),
        worker_pid=worker_pid or 0,
        steps=tracer.since(since_step),
    )
