"""The scheduler's doorbell send never blocks on a worker that is gone (a real PUSH socket, no peer).

A PUSH socket with no connected peer blocks its sender. The worker dying between the scheduler's
periodic checks, just before a launch, used to hang the scheduler there and every request it held.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import zmq

from tandem.scheduler.process import SchedulerProcess


class _Worker:
    def __init__(self, problem: str | None) -> None:
        self.problem = problem

    def check(self) -> str | None:
        return self.problem


class _Core:
    def step_hung(self) -> bool:
        return False


def _proc(bells: zmq.Socket, worker: _Worker) -> tuple[SchedulerProcess, list[str]]:
    proc = SchedulerProcess.__new__(SchedulerProcess)  # only what _to_worker reads
    restarts: list[str] = []
    proc.bells, proc.worker, proc.core = bells, worker, _Core()  # type: ignore[assignment]
    proc._check_worker = lambda: restarts.append("restarted")  # type: ignore[method-assign]
    return proc, restarts


def test_a_dead_workers_doorbell_returns_instead_of_blocking(tmp_path: Path) -> None:
    ctx = zmq.Context()
    bells = ctx.socket(zmq.PUSH)
    bells.setsockopt(zmq.LINGER, 0)
    bells.bind(f"ipc://{tmp_path}/bells")
    try:
        proc, restarts = _proc(bells, _Worker("worker was killed by SIGKILL"))
        done = threading.Event()
        result: list[bool] = []
        t = threading.Thread(
            target=lambda: (result.append(proc._to_worker(b"bell")), done.set()), daemon=True
        )
        t.start()
        assert done.wait(5), "the send blocked on a socket with no peer"
        assert result == [False] and restarts == ["restarted"]
    finally:
        bells.close()
        ctx.term()


def test_a_fresh_worker_that_connects_late_gets_its_doorbell(tmp_path: Path) -> None:
    ctx = zmq.Context()
    bells = ctx.socket(zmq.PUSH)
    bells.setsockopt(zmq.LINGER, 0)
    addr = f"ipc://{tmp_path}/bells"
    bells.bind(addr)
    pull = ctx.socket(zmq.PULL)
    try:
        proc, restarts = _proc(bells, _Worker(None))  # alive, not connected yet
        threading.Timer(0.2, lambda: pull.connect(addr)).start()
        t0 = time.monotonic()
        assert proc._to_worker(b"bell") and not restarts
        assert time.monotonic() - t0 < 5
        assert pull.poll(5000) and pull.recv() == b"bell"
    finally:
        pull.close(linger=0)
        bells.close()
        ctx.term()
