"""asyncio client of the tandem ZeroMQ protocol (PROTOCOL.md).

One reader task routes every frame to its request by request_id, so any number of requests may
run at once on one client (one connection). Use it from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from typing import Any

import zmq
import zmq.asyncio

from tandem.client.common import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Completion,
    EmbeddingResult,
    EmbedState,
    RequestState,
    TandemTimeout,
    build_request,
    check_hello,
    client_socket,
    close_sockets,
    disconnected,
    is_disconnect,
    new_request_id,
    normalize_url,
    timeout_error,
)
from tandem.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    ClientHello,
    Embedding,
    EmbedInputRequest,
    ErrorCode,
    Finished,
    GenerateRequest,
    Health,
    HealthRequest,
    MessageError,
    RequestError,
    ServerHello,
    TokenDelta,
    decode,
    encode,
)

log = logging.getLogger(__name__)


class AsyncTandemClient:
    """Connects on first use (or ``await client.connect()``); ``timeout`` as in TandemClient."""

    def __init__(
        self,
        url: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        client_name: str = "tandem-python-async",
        zmq_ctx: zmq.asyncio.Context | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.client_name = client_name
        self._own_ctx = zmq_ctx is None
        self._ctx = zmq_ctx or zmq.asyncio.Context()
        self._sock: Any = None
        self._monitor: Any = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._health: dict[int, asyncio.Future[Health]] = {}
        self._hello: asyncio.Future[ServerHello] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._qids = itertools.count(1)
        self.server: ServerHello | None = None
        # Frames for a request id this client does not track (any more): a request it cancelled
        # still gets its last frames; otherwise each is a frame past a request's terminal one.
        self.stray_frames = 0

    # -- connection ----------------------------------------------------------------------
    async def connect(self) -> ServerHello:
        async with self._lock:
            if self.server is not None:
                return self.server
            if self._sock is None:
                self._sock, self._monitor = client_socket(self._ctx, self.url)  # type: ignore[arg-type]
                self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
            self._hello = asyncio.get_running_loop().create_future()
            try:
                await self._sock.send(encode(ClientHello(PROTOCOL_VERSION, self.client_name)))
                try:
                    hello = await asyncio.wait_for(self._hello, self.connect_timeout)
                except TimeoutError:
                    raise TandemTimeout(
                        ErrorCode.TIMEOUT,
                        f"no tandem server answered at {self.url} within {self.connect_timeout} s",
                    ) from None
                self.server = check_hello(hello, self.url)
            except BaseException:
                await self._teardown()  # a later connect() starts afresh
                raise
            return self.server

    async def close(self) -> None:
        await self._teardown()
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    async def _teardown(self) -> None:
        for t in self._tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for rid, q in self._queues.items():
            q.put_nowait(RequestError(rid, "disconnected", "the client was closed"))
        if self._sock is not None:
            close_sockets(self._sock, self._monitor)
            self._sock = self._monitor = None

    async def __aenter__(self) -> AsyncTandemClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public API ----------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[Any] | None = None,
        raw: bool = False,
        system: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Completion:
        """The whole completion in one reply (the server sends no per-token frames)."""
        rid = request_id or new_request_id()
        req = build_request(rid, prompt, prompt_token_ids, messages, raw, system, False, sampling)
        async with AsyncStream(self, req, RequestState(rid, collect=True), self._timeout(timeout)) as s:
            async for _ in s:
                pass
        return s.state.completion

    def stream(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[Any] | None = None,
        raw: bool = False,
        system: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncStream:
        """An async iterator of TokenDelta (use ``async with`` so an early exit cancels)."""
        rid = request_id or new_request_id()
        req = build_request(rid, prompt, prompt_token_ids, messages, raw, system, True, sampling)
        return AsyncStream(self, req, RequestState(rid, collect=False), self._timeout(timeout))

    async def embed(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        truncate: bool = True,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> EmbeddingResult:
        """One input's embedding (protocol 1.3), as TandemClient.embed."""
        await self.connect()
        rid = request_id or new_request_id()
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already in use on this client")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = queue
        state, wait = EmbedState(rid), self._timeout(timeout)
        try:
            await self._sock.send(encode(EmbedInputRequest(rid, prompt, prompt_token_ids, truncate)))
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    raise timeout_error(rid, wait or 0.0) from None
                result = state.feed(msg)
                if result is not None:
                    return result
        finally:
            if self._queues.get(rid) is queue:
                del self._queues[rid]
            if not state.done:
                with contextlib.suppress(zmq.ZMQError):
                    await self.cancel(rid)

    async def cancel(self, request_id: str) -> None:
        """Ask the server to stop a request; its stream then ends with finish_reason 'cancelled'."""
        if self._sock is not None:
            await self._sock.send(encode(Cancel(request_id)))

    async def health(self, timeout: float = 5.0) -> Health:
        await self.connect()
        qid = next(self._qids)
        fut: asyncio.Future[Health] = asyncio.get_running_loop().create_future()
        self._health[qid] = fut
        try:
            await self._sock.send(encode(HealthRequest(qid)))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TandemTimeout(
                ErrorCode.TIMEOUT, f"no health reply from {self.url} within {timeout} s"
            ) from None
        finally:
            self._health.pop(qid, None)

    # -- plumbing ------------------------------------------------------------------------
    def _timeout(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None or t == math.inf else t

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                msg = decode(frames[-1])
            except MessageError as e:
                log.warning("dropping a frame from %s that did not decode: %s", self.url, e)
                continue
            if isinstance(msg, Accepted | TokenDelta | Embedding | Finished | RequestError):
                q = self._queues.get(msg.request_id)
                if q is not None:
                    q.put_nowait(msg)
                elif isinstance(msg, RequestError) and msg.request_id == "":
                    log.warning("server error on %s: %s: %s", self.url, msg.code, msg.message)
                else:
                    self.stray_frames += 1
            elif isinstance(msg, ServerHello):
                if self._hello is not None and not self._hello.done():
                    self._hello.set_result(msg)
            elif isinstance(msg, Health):
                fut = self._health.get(msg.query_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def _watch(self) -> None:
        # The server forgets a connection that drops (a reconnect is a new peer): fail what it had.
        while True:
            if is_disconnect(await self._monitor.recv_multipart()):
                await asyncio.sleep(0.05)  # let the reader route what arrived before the drop
                for rid, q in self._queues.items():
                    q.put_nowait(disconnected(rid, self.url))


class AsyncStream:
    """One request's TokenDelta frames; sent on first iteration. Leaving it early cancels the request."""

    def __init__(
        self, client: AsyncTandemClient, req: GenerateRequest, state: RequestState, timeout: float | None
    ) -> None:
        self._client = client
        self._req: GenerateRequest | None = req
        self.state = state
        self.timeout = timeout
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def request_id(self) -> str:
        return self.state.request_id

    @property
    def finished(self) -> Finished | None:
        return self.state.finished

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.state.completion.prompt_token_ids

    def __aiter__(self) -> AsyncStream:
        return self

    async def _send(self, req: GenerateRequest) -> None:
        c = self._client
        await c.connect()
        if self.request_id in c._queues:
            self.state.done = True
            raise ValueError(f"request id {self.request_id!r} is already in use on this client")
        c._queues[self.request_id] = self._queue
        await c._sock.send(encode(req))

    async def __anext__(self) -> TokenDelta:
        if self._req is not None:
            req, self._req = self._req, None
            await self._send(req)
        while not self.state.done:
            try:
                msg = await asyncio.wait_for(self._queue.get(), self.timeout)
            except TimeoutError:
                await self.aclose()
                raise timeout_error(self.request_id, self.timeout or 0.0) from None
            try:
                delta = self.state.feed(msg)
            finally:
                if self.state.done:
                    self._client._queues.pop(self.request_id, None)
                    # frames already routed here behind the terminal one are strays too
                    self._client.stray_frames += self._queue.qsize()
            if delta is not None:
                return delta
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self.state.done:
            return
        self.state.done = True
        if self._client._queues.get(self.request_id) is self._queue:
            del self._client._queues[self.request_id]
            with contextlib.suppress(zmq.ZMQError):
                await self._client.cancel(self.request_id)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
