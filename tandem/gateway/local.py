"""Drive one request through an EngineProcess synchronously: the engine behind `tandem generate`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zmq

from tandem.gateway.engine_process import EngineProcess
from tandem.messages import (
    CancelRequest,
    ErrorCode,
    Finished,
    OutputBatch,
    RequestError,
    SamplingParams,
    Stats,
    StatsRequest,
    SubmitRequest,
    TokenDelta,
    decode,
    encode,
)


class EngineError(RuntimeError):
    def __init__(self, code: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # busy: the scheduler's estimate of the wait


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    finished: Finished | None = None
    logprobs: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def stream(
    engine: EngineProcess,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str | None = None,
    health_interval: float = 0.25,
) -> Iterator[TokenDelta | Finished]:
    """Yield the request's deltas, then its Finished; raise EngineError on its error frame."""
    assert engine.to_sched is not None and engine.from_sched is not None
    rid = request_id or uuid.uuid4().hex
    engine.to_sched.send(encode(SubmitRequest(rid, list(prompt_ids), params, time.monotonic())))
    done = False
    try:
        while not done:
            if not engine.from_sched.poll(int(health_interval * 1000)):
                problem = engine.check()
                if problem:
                    raise EngineError(ErrorCode.WORKER_DIED, problem)
                continue
            msg = decode(engine.from_sched.recv())
            if not isinstance(msg, OutputBatch):
                continue
            for err in msg.errors:
                if err.request_id == rid:
                    done = True
                    raise EngineError(err.code, err.message, err.retry_after_s)
            for d in msg.deltas:
                if d.request_id == rid:
                    yield d
            for f in msg.finished:
                if f.request_id == rid:
                    done = True
                    yield f
    finally:
        if not done and engine.to_sched is not None:  # abandoned (Ctrl-C, consumer gone): free its blocks
            engine.to_sched.send(encode(CancelRequest(rid)))


def complete(
    engine: EngineProcess,
    prompt_ids: list[int],
    params: SamplingParams,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    t0 = time.perf_counter()
    c = Completion(request_id=uuid.uuid4().hex, prompt_token_ids=list(prompt_ids))
    for ev in stream(engine, prompt_ids, params, c.request_id):
        if isinstance(ev, TokenDelta):
            c.token_ids += ev.token_ids
            c.text += ev.text
            if ev.logprobs:
                c.logprobs += ev.logprobs
            if on_text and ev.text:
                on_text(ev.text)
        else:
            c.finished = ev
            c.finish_reason = ev.finish_reason
    c.wall_s = time.perf_counter() - t0
    return c


def query_stats(engine: EngineProcess, timeout: float = 5.0) -> Stats:
    """Ask the scheduler for its counters; output frames that arrive meanwhile are dropped."""
    assert engine.to_sched is not None and engine.from_sched is not None
    qid = int(time.monotonic_ns() & 0x7FFFFFFF)
    engine.to_sched.send(encode(StatsRequest(qid)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.from_sched.poll(100, zmq.POLLIN):
            msg = decode(engine.from_sched.recv())
            if isinstance(msg, Stats) and msg.query_id == qid:
                return msg
    raise EngineError(ErrorCode.TIMEOUT, f"no stats from the scheduler within {timeout} s")


__all__ = ["Completion", "EngineError", "RequestError", "complete", "query_stats", "stream"]
