"""Drive many requests through an EngineProcess at once, reading the scheduler's raw frames.

Unlike the engine client (tandem.engine), which forgets a request at its terminal frame, this
harness keeps counting what arrives for every request, so a second terminal frame or a delta
after one fails the test instead of being dropped quietly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tandem.config import EngineConfig
from tandem.engine.process import EngineProcess
from tandem.messages import (
    CancelRequest,
    Finished,
    OutputBatch,
    RequestError,
    SamplingParams,
    Stats,
    StatsRequest,
    SubmitRequest,
    decode,
    encode,
)


@dataclass
class Outcome:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: Finished | None = None
    error: RequestError | None = None
    terminals: int = 0  # must end up exactly 1


def submit(engine: EngineProcess, rid: str, prompt: list[int], params: SamplingParams) -> None:
    assert engine.to_sched is not None
    engine.to_sched.send(encode(SubmitRequest(rid, prompt, params, time.monotonic())))


def cancel(engine: EngineProcess, rid: str) -> None:
    assert engine.to_sched is not None
    engine.to_sched.send(encode(CancelRequest(rid)))


def pump(engine: EngineProcess, outcomes: dict[str, Outcome], timeout: float = 60.0, until=None) -> None:
    """Read frames until every outcome has its terminal (or ``until(outcomes)`` is true)."""
    assert engine.from_sched is not None
    deadline = time.monotonic() + timeout
    done = until or (lambda o: all(x.terminals for x in o.values()))
    while not done(outcomes):
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        if not engine.from_sched.poll(100):
            continue
        msg = decode(engine.from_sched.recv())
        if not isinstance(msg, OutputBatch):
            continue
        for d in msg.deltas:
            o = outcomes[d.request_id]
            assert o.terminals == 0, f"delta after the terminal frame for {d.request_id}"
            o.token_ids += d.token_ids
            o.text += d.text
        for f in msg.finished:
            outcomes[f.request_id].finished = f
            outcomes[f.request_id].terminals += 1
        for e in msg.errors:
            outcomes[e.request_id].error = e
            outcomes[e.request_id].terminals += 1


def run_all(
    engine: EngineProcess, requests: dict[str, tuple[list[int], SamplingParams]], timeout: float = 120.0
) -> dict[str, Outcome]:
    outcomes = {rid: Outcome() for rid in requests}
    for rid, (prompt, params) in requests.items():
        submit(engine, rid, prompt, params)
    pump(engine, outcomes, timeout)
    return outcomes


def stats(engine: EngineProcess) -> Stats:
    assert engine.to_sched is not None and engine.from_sched is not None
    engine.to_sched.send(encode(StatsRequest(7)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if engine.from_sched.poll(100):
            msg = decode(engine.from_sched.recv())
            if isinstance(msg, Stats):
                return msg
    raise AssertionError("no stats")


def make_engine(path: Path, **overrides: object) -> EngineProcess:
    # float32 unless a test asks otherwise: tests compare batched outputs with solo runs token for
    # token, which only the exact path guarantees (bf16 rounds differently as batches change shape).
    settings: dict = {"kv_cache_memory": 16 * 2**20, "dtype": "float32", **overrides}
    cfg = EngineConfig(model_path=str(path), model_name="tiny", **settings)
    return EngineProcess(cfg).start()
