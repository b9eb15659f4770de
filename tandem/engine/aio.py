"""The engine client for asyncio code (the gateway): submit, stream, cancel, stats.

One reader task feeds every frame the scheduler sends to the router, and puts each request's
events on its consumer's queue, so any number of front ends (ZeroMQ clients, HTTP) share one
pair of sockets. A request whose consumer goes away (client disconnect, task cancelled) is cancelled
in the scheduler, which frees its batch slot and KV blocks within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from tandem.config import EngineConfig
from tandem.engine.process import EngineProcess
from tandem.engine.router import EngineError, Router
from tandem.messages import (
    Embedding,
    ErrorCode,
    Finished,
    RequestError,
    SamplingParams,
    Stats,
    StepTrace,
    TokenDelta,
)
from tandem.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Event = TokenDelta | Embedding | Finished
# Per request, what the gateway holds for a consumer that is behind: beyond it the consumer is
# taken to have stopped reading. A reader that keeps up holds a handful.
MAX_BUFFERED_EVENTS = 4096


class AsyncEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self._zctx = zmq.asyncio.Context()
        self.process = EngineProcess(cfg, self._zctx)  # type: ignore[arg-type]
        self.router = Router()
        self._queues: dict[str, asyncio.Queue[Event | RequestError]] = {}
        self._stats_waiters: dict[int, asyncio.Future[Any]] = {}  # Stats and StepTrace replies
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.dead: str | None = None  # why the engine stopped working, once it has
        self._died = asyncio.Event()  # set together with ``dead``
        self._cancels: set[asyncio.Future[Any]] = set()  # cancels sent from the (sync) router
        self.started_at = 0.0
        self.load_seconds = 0.0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> AsyncEngine:
        t0 = time.perf_counter()
        self.process.bind()
        await asyncio.to_thread(self.process.spawn)
        self.load_seconds = time.perf_counter() - t0
        self.started_at = time.time()
        self.router.vocab_size = self.tokenizer.vocab_size
        self.router.context_length = self.context_length
        self._reader = asyncio.create_task(self._read_loop(), name="engine-reader")
        self._watchdog = asyncio.create_task(self._watch(), name="engine-watchdog")
        return self

    @property
    def tokenizer(self) -> Tokenizer:
        assert self.process.tokenizer is not None
        return self.process.tokenizer

    @property
    def context_length(self) -> int:
        return self.process.context_length

    @property
    def ready_info(self) -> dict[str, Any]:
        return self.process.ready_info

    @property
    def num_active(self) -> int:
        return len(self._queues)

    async def close(self, drain: bool = False, timeout: float = 30.0) -> int | None:
        """Stop the engine. With ``drain``, running requests finish first (up to ``timeout``)."""
        if self._closed:
            return None
        if drain and self.process.scheduler is not None and self._queues:
            self.process.scheduler.request_stop("drain", drain=True)
            deadline = time.monotonic() + timeout
            while self._queues and time.monotonic() < deadline and self.dead is None:
                await asyncio.sleep(0.05)
        for task in (self._reader, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._fail_all(ErrorCode.SHUTTING_DOWN, "server is shutting down")
        self._closed = True
        code = await asyncio.to_thread(self.process.close)
        self._zctx.term()
        return code

    # -- requests ------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        checked: bool = False,
    ) -> AsyncIterator[Event]:
        """Stream a request's deltas and its Finished; raise EngineError on its error frame, or
        when it breaks a rule of tandem.validation (unless ``checked``: see Router.submit).

        Closing the iterator early (the consumer went away) cancels the request.
        """
        if self.dead is not None:
            raise EngineError(ErrorCode.WORKER_DIED, self.dead)
        rid, frame = self.router.submit(prompt_ids, params, request_id, checked=checked)
        queue: asyncio.Queue[Event | RequestError] = asyncio.Queue()
        self._queues[rid] = queue
        finished = False
        try:
            await self._send_unless_dead(frame)
            while True:
                ev = await queue.get()
                if isinstance(ev, RequestError):
                    finished = True
                    raise EngineError.of(ev)
                if isinstance(ev, Finished):
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            cancel = self.router.cancel(rid, "client went away")  # None once it has ended
            if cancel is not None and self.dead is None and self.process.to_sched is not None:
                with contextlib.suppress(Exception):
                    await self.process.to_sched.send(cancel)

    async def embed(self, prompt_ids: list[int], request_id: str | None = None) -> tuple[Embedding, Finished]:
        """One input's embedding and its Finished (prompt_tokens, timings); EngineError on its
        error frame. Cancelled in the scheduler if the caller goes away first."""
        if self.dead is not None:
            raise EngineError(ErrorCode.WORKER_DIED, self.dead)
        rid, frame = self.router.embed(prompt_ids, request_id)
        queue: asyncio.Queue[Event | RequestError] = asyncio.Queue()
        self._queues[rid] = queue
        vector: Embedding | None = None
        try:
            await self._send_unless_dead(frame)
            while True:
                ev = await queue.get()
                if isinstance(ev, RequestError):
                    raise EngineError.of(ev)
                if isinstance(ev, Embedding):
                    vector = ev
                elif isinstance(ev, Finished):
                    if vector is None:
                        raise EngineError(ErrorCode.INTERNAL, "the embedding finished without a vector")
                    return vector, ev
        finally:
            self._queues.pop(rid, None)
            cancel = self.router.cancel(rid, "client went away")
            if cancel is not None and self.dead is None and self.process.to_sched is not None:
                with contextlib.suppress(Exception):
                    await self.process.to_sched.send(cancel)

    async def _send_unless_dead(self, frame: bytes) -> None:
        """Send to the scheduler, or raise worker_died if the engine dies first: a PUSH whose
        peer is gone blocks until the peer reconnects, which a dead scheduler never does, and
        the request would then end with the server's shutdown instead of the engine's error."""
        assert self.process.to_sched is not None
        send = asyncio.ensure_future(self.process.to_sched.send(frame))
        died = asyncio.ensure_future(self._died.wait())
        try:
            await asyncio.wait({send, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not send.done():
            send.cancel()
            raise EngineError(ErrorCode.WORKER_DIED, self.dead or "the engine stopped")
        send.result()

    async def stats(self, timeout: float = 5.0) -> Stats:
        return await self._query(self.router.stats_query, timeout)

    async def trace(self, since_step: int = 0, timeout: float = 5.0) -> StepTrace:
        """The scheduler's recorded step timings (EngineConfig.trace_steps) from ``since_step`` on."""
        return await self._query(lambda: self.router.trace_query(since_step), timeout)

    async def _query(self, make: Any, timeout: float) -> Any:
        if self.dead is not None or self.process.to_sched is None:
            raise EngineError(ErrorCode.WORKER_DIED, self.dead or "engine not running")
        qid, frame = make()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._stats_waiters[qid] = fut
        try:
            await self.process.to_sched.send(frame)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._stats_waiters.pop(qid, None)

    # -- plumbing ------------------------------------------------------------------------
    def _route(self, frame: bytes) -> None:
        routed = self.router.feed(frame)
        for rid, ev in routed.events:
            q = self._queues.get(rid)
            if q is None:
                continue
            if isinstance(ev, TokenDelta) and q.qsize() >= MAX_BUFFERED_EVENTS:
                self._overflow(rid, q)
            else:
                q.put_nowait(ev)
        for reply in routed.replies:
            fut = self._stats_waiters.get(reply.query_id)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    def _overflow(self, rid: str, q: asyncio.Queue[Event | RequestError]) -> None:
        """A consumer this far behind is not reading: fail the request and cancel it in the
        scheduler, as for a disconnect, rather than buffer its whole reply here."""
        del self._queues[rid]
        q.put_nowait(
            RequestError(
                rid, ErrorCode.CANCELLED, f"the client fell {MAX_BUFFERED_EVENTS} tokens behind the stream"
            )
        )
        log.warning("request %s cancelled: its client fell %d tokens behind", rid, MAX_BUFFERED_EVENTS)
        cancel = self.router.cancel(rid, "client too slow")
        if cancel is not None and self.process.to_sched is not None:
            task = asyncio.ensure_future(self.process.to_sched.send(cancel))
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)

    async def _read_loop(self) -> None:
        sock = self.process.from_sched
        assert sock is not None
        while True:
            frame = await sock.recv()
            try:
                self._route(frame)
            except Exception:
                log.exception("dropping a frame from the scheduler that did not decode")

    async def _watch(self) -> None:
        while self.dead is None:
            await asyncio.sleep(0.2)
            problem = self.process.check()
            if problem:
                self.dead = problem
                self._died.set()
                log.error("engine failed: %s", problem)
                self._fail_all(ErrorCode.WORKER_DIED, problem)

    def _fail_all(self, code: str, message: str) -> None:
        for rid, q in list(self._queues.items()):
            q.put_nowait(RequestError(rid, code, message))
