"""The engine client, blocking: one consumer reads the scheduler's frames itself.

`tandem generate`, `tandem bench` and the multiprocess tests use it over an EngineProcess that
runs a plain (not asyncio) ZeroMQ context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from tandem.engine.process import EngineProcess
from tandem.engine.router import Completion, EngineError, Event, Router
from tandem.messages import ErrorCode, Finished, RequestError, SamplingParams, Stats, TokenDelta


class SyncEngine:
    def __init__(self, process: EngineProcess, health_interval: float = 0.25) -> None:
        self.process = process
        tok = process.tokenizer
        self.router = Router(tok.vocab_size if tok is not None else 0, process.context_length)
        self.health_interval = health_interval

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        assert self.process.to_sched is not None, "engine not started"
        rid, frame = self.router.submit(prompt_ids, params, request_id)
        self.process.to_sched.send(frame)
        return rid

    def cancel(self, request_id: str) -> None:
        frame = self.router.cancel(request_id)
        if frame is not None and self.process.to_sched is not None:
            self.process.to_sched.send(frame)

    def next_events(self, timeout: float | None = None) -> list[tuple[str, Event]]:
        """Events of the requests in flight from the next frame (empty when ``timeout`` passed);
        EngineError(worker_died) when the engine dies meanwhile."""
        sock = self.process.from_sched
        assert sock is not None, "engine not started"
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = (
                self.health_interval
                if deadline is None
                else min(self.health_interval, deadline - time.monotonic())
            )
            if sock.poll(max(0, int(wait * 1000))):
                return self.router.feed(sock.recv()).events
            problem = self.process.check()
            if problem:
                raise EngineError(ErrorCode.WORKER_DIED, problem)
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Iterator[TokenDelta | Finished]:
        """The request's deltas, then its Finished; EngineError on its error frame. Closing the
        iterator early (Ctrl-C, consumer gone) cancels it, which frees its KV blocks."""
        rid = self.submit(prompt_ids, params, request_id)
        try:
            while True:
                for erid, ev in self.next_events():
                    if erid != rid:
                        continue
                    if isinstance(ev, RequestError):
                        raise EngineError.of(ev)
                    yield ev
                    if isinstance(ev, Finished):
                        return
        finally:
            self.cancel(rid)  # a no-op once it has ended

    def complete(
        self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None] | None = None
    ) -> Completion:
        t0 = time.perf_counter()
        c = Completion(self.router.new_request_id(), list(prompt_ids))
        for ev in self.stream(prompt_ids, params, c.request_id):
            c.add(ev)
            if on_text is not None and isinstance(ev, TokenDelta) and ev.text:
                on_text(ev.text)
        c.wall_s = time.perf_counter() - t0
        return c

    def run_all(
        self, requests: dict[str, tuple[list[int], SamplingParams]], timeout: float = 120.0
    ) -> dict[str, Completion | EngineError]:
        """Submit every request at once; each one's Completion, or the error it ended with."""
        results: dict[str, Completion | EngineError] = {}
        pending = {rid: Completion(rid, list(ids)) for rid, (ids, _) in requests.items()}
        for rid, (ids, params) in requests.items():
            try:
                self.submit(ids, params, rid)
            except EngineError as e:  # refused before it was sent
                results[rid] = e
                del pending[rid]
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(
                    ErrorCode.TIMEOUT, f"{len(pending)} requests did not finish within {timeout} s"
                )
            for rid, ev in self.next_events(left):
                if isinstance(ev, RequestError):
                    results[rid] = EngineError.of(ev)
                    del pending[rid]
                    continue
                pending[rid].add(ev)
                if isinstance(ev, Finished):
                    results[rid] = pending.pop(rid)
        return results

    def stats(self, timeout: float = 5.0) -> Stats:
        """The scheduler's counters; output frames that arrive meanwhile are routed as usual
        (a request in flight meanwhile loses them: ask between requests)."""
        assert self.process.to_sched is not None and self.process.from_sched is not None
        qid, frame = self.router.stats_query()
        self.process.to_sched.send(frame)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.from_sched.poll(100):
                for s in self.router.feed(self.process.from_sched.recv()).replies:
                    if isinstance(s, Stats) and s.query_id == qid:
                        return s
        raise EngineError(ErrorCode.TIMEOUT, f"no stats from the scheduler within {timeout} s")
