"""Blocking client of the tandem ZeroMQ protocol (PROTOCOL.md).

Not thread-safe: a ZeroMQ socket belongs to one thread, so use one TandemClient per thread. Several
streams may be open at once on one client; frames for the others are buffered while one is read.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import zmq

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


class TandemClient:
    """``timeout``: the longest wait for the next frame of a request (None: forever); a call's own
    ``timeout`` overrides it (None there: the client's; ``math.inf``: forever)."""

    def __init__(
        self,
        url: str,
        timeout: float | None = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        client_name: str = "tandem-python",
        zmq_ctx: zmq.Context | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.timeout = timeout
        self._own_ctx = zmq_ctx is None
        self._ctx = zmq_ctx or zmq.Context()
        self._sock, self._monitor = client_socket(self._ctx, self.url)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._buffers: dict[str, deque[Any]] = {}  # request id -> frames not yet read
        self._abandoned: set[str] = set()  # cancelled by us; their remaining frames are dropped
        self._health: dict[int, Health] = {}
        self._qids = itertools.count(1)
        self.server: ServerHello | None = None
        try:
            self._sock.send(encode(ClientHello(PROTOCOL_VERSION, client_name)))
            deadline = time.monotonic() + connect_timeout
            while self.server is None:
                if not self._pump(deadline):
                    raise TandemTimeout(
                        ErrorCode.TIMEOUT,
                        f"no tandem server answered at {self.url} within {connect_timeout} s",
                    )
            check_hello(self.server, self.url)
        except BaseException:
            self.close()
            raise

    # -- public API ----------------------------------------------------------------------
    def generate(
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
        with self._open(req, timeout) as s:
            for _ in s:
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
    ) -> Stream:
        """An iterator of TokenDelta; ``.finished`` holds the Finished frame once it is exhausted."""
        rid = request_id or new_request_id()
        return self._open(
            build_request(rid, prompt, prompt_token_ids, messages, raw, system, True, sampling), timeout
        )

    def embed(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        truncate: bool = True,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> EmbeddingResult:
        """One input's embedding (protocol 1.3, capability ``embeddings``): text (no chat
        template) or token ids; past the model's limit it is cut, or with ``truncate=False``
        refused (ContextLengthError)."""
        rid = request_id or new_request_id()
        if rid in self._buffers or rid in self._abandoned:
            raise ValueError(f"request id {rid!r} is already in use on this client")
        self._buffers[rid] = deque()
        self._sock.send(encode(EmbedInputRequest(rid, prompt, prompt_token_ids, truncate)))
        state = EmbedState(rid)
        try:
            while True:
                result = state.feed(self._next_frame(rid, self.timeout if timeout is None else timeout))
                if result is not None:
                    return result
        finally:
            self._forget(rid, cancel=not state.done)

    def cancel(self, request_id: str) -> None:
        """Ask the server to stop a request; its stream then ends with finish_reason 'cancelled'."""
        self._sock.send(encode(Cancel(request_id)))

    def health(self, timeout: float = 5.0) -> Health:
        qid = next(self._qids)
        self._sock.send(encode(HealthRequest(qid)))
        deadline = time.monotonic() + timeout
        while qid not in self._health:
            if not self._pump(deadline):
                raise TandemTimeout(ErrorCode.TIMEOUT, f"no health reply from {self.url} within {timeout} s")
        return self._health.pop(qid)

    def close(self) -> None:
        close_sockets(self._sock, self._monitor)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------
    def _open(self, req: GenerateRequest, timeout: float | None) -> Stream:
        rid = req.request_id
        if rid in self._buffers or rid in self._abandoned:
            raise ValueError(f"request id {rid!r} is already in use on this client")
        self._buffers[rid] = deque()
        self._sock.send(encode(req))
        state = RequestState(rid, collect=not req.stream)
        return Stream(self, state, self.timeout if timeout is None else timeout)

    def _next_frame(self, rid: str, timeout: float | None) -> Any:
        buf = self._buffers[rid]
        deadline = None if timeout is None or timeout == math.inf else time.monotonic() + timeout
        while not buf:
            if not self._pump(deadline):
                raise timeout_error(rid, timeout or 0.0)
        return buf.popleft()

    def _forget(self, rid: str, cancel: bool) -> None:
        self._buffers.pop(rid, None)
        if cancel and not self._sock.closed:
            self._abandoned.add(rid)
            self.cancel(rid)

    def _pump(self, deadline: float | None) -> bool:
        """Route what arrives until at least one frame has; False once ``deadline`` passes first."""
        timeout_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        events = dict(self._poller.poll(timeout_ms))
        if not events:
            return False
        if self._sock in events:
            self._recv()
        if self._monitor in events and is_disconnect(self._monitor.recv_multipart()):
            while self._sock.poll(0):  # what arrived before the connection dropped comes first
                self._recv()
            for rid, buf in self._buffers.items():
                buf.append(disconnected(rid, self.url))
            self._abandoned.clear()
        return True

    def _recv(self) -> None:
        frames = self._sock.recv_multipart()
        try:
            self._route(decode(frames[-1]))
        except MessageError as e:
            log.warning("dropping a frame from %s that did not decode: %s", self.url, e)

    def _route(self, msg: Any) -> None:
        if isinstance(msg, Accepted | TokenDelta | Embedding | Finished | RequestError):
            rid = msg.request_id
            if rid in self._buffers:
                self._buffers[rid].append(msg)
            elif isinstance(msg, Finished | RequestError) and rid in self._abandoned:
                self._abandoned.discard(rid)
            elif rid == "":
                log.warning("server error on %s: %s: %s", self.url, msg.code, msg.message)  # type: ignore[union-attr]
        elif isinstance(msg, ServerHello):
            self.server = msg
        elif isinstance(msg, Health):
            self._health[msg.query_id] = msg


class Stream:
    """One request's TokenDelta frames. Closing it before the end cancels the request."""

    def __init__(self, client: TandemClient, state: RequestState, timeout: float | None) -> None:
        self._client = client
        self.state = state
        self.timeout = timeout

    @property
    def request_id(self) -> str:
        return self.state.request_id

    @property
    def finished(self) -> Finished | None:
        return self.state.finished

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.state.completion.prompt_token_ids

    def __iter__(self) -> Iterator[TokenDelta]:
        return self

    def __next__(self) -> TokenDelta:
        while not self.state.done:
            try:
                msg = self._client._next_frame(self.request_id, self.timeout)
            except TandemTimeout:
                self.close()
                raise
            try:
                delta = self.state.feed(msg)
            finally:
                if self.state.done:
                    self._client._forget(self.request_id, cancel=False)
            if delta is not None:
                return delta
        raise StopIteration

    def close(self) -> None:
        if not self.state.done:
            self.state.done = True
            self._client._forget(self.request_id, cancel=True)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A stream dropped unfinished (a `break` without `with`) would otherwise run on server-side.
        try:
            self.close()
        except Exception:
            pass
