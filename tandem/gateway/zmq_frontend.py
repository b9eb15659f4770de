"""The ZeroMQ client protocol (PROTOCOL.md) served on a ROUTER socket over an AsyncEngine.

Frames in are ``[identity, payload]`` (DEALER clients) or ``[identity, b"", payload]`` (clients
that send REQ-style envelopes; replies to them carry the empty delimiter too). Each request runs
in its own task; the task's done-callback, not its body, sends the terminal frame, so a request
cancelled before it ever ran still gets exactly one terminal frame. A failed send (ROUTER_MANDATORY
raises EHOSTUNREACH for a vanished peer) cancels everything that client had in flight; sending and
noticing vanished clients live in zmq_peers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from tandem import __version__
from tandem.actors.sockets import (
    DATA_LINGER_MS,
    ipc_address,
    ipc_path,
    make_runtime_dir,
    make_socket,
    remove_ipc_file,
    remove_runtime_dir,
)
from tandem.gateway.async_engine import AsyncEngine
from tandem.gateway.local import EngineError
from tandem.gateway.zmq_peers import PROBE_INTERVAL_S, SEND_TIMEOUT_S, Client, ClientRequest, Peers
from tandem.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    ClientHello,
    Finished,
    GenerateRequest,
    Health,
    HealthRequest,
    InvalidParameterError,
    MessageError,
    RequestError,
    ServerHello,
    TokenDelta,
    decode,
)
from tandem.models.chat_template import ChatTemplateError
from tandem.models.prompt import chat_ids, prompt_ids
from tandem.models.tokenizer import TokenizerError

log = logging.getLogger(__name__)

CAPABILITIES = ["stream", "cancel", "chat", "prompt_token_ids", "logprobs", "logits", "health"]
TERMINAL_LINGER_MS = 500  # time at close for terminal frames still queued to reach their clients

# Where they were defined before the per-client bookkeeping moved to zmq_peers.py.
__all__ = ["CAPABILITIES", "PROBE_INTERVAL_S", "SEND_TIMEOUT_S", "TERMINAL_LINGER_MS", "ZmqFrontend"]


class ZmqFrontend:
    def __init__(
        self,
        engine: AsyncEngine,
        endpoints: list[str],
        zmq_ctx: zmq.asyncio.Context | None = None,
        max_msg_size: int = 16 * 2**20,
        max_inflight_per_client: int = 256,
        runtime_dir: Path | None = None,
    ) -> None:
        """``endpoints``: ``ipc://PATH``, ``ipc://`` (a fresh path in a 0700 runtime dir) or
        ``tcp://HOST:PORT`` (port 0 picks a free one). ``.endpoints`` holds what was bound."""
        self.engine = engine
        self.requested = list(endpoints)
        self.endpoints: list[str] = []
        self._own_ctx = zmq_ctx is None
        self._ctx = zmq_ctx or zmq.asyncio.Context()
        self.max_msg_size = max_msg_size
        self.max_inflight = max_inflight_per_client
        self.runtime_dir = runtime_dir
        self._own_dir = False
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._peers = Peers(self._spawn)
        self._clients = self._peers.clients  # the clients with requests in flight, by identity
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        self.started_at = time.time()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> ZmqFrontend:
        sock = make_socket(self._ctx, zmq.ROUTER, linger_ms=DATA_LINGER_MS, max_msg_size=self.max_msg_size)
        self._sock = sock  # type: ignore[assignment]
        self._peers.attach(sock)  # type: ignore[arg-type]
        try:
            for ep in self.requested:
                sock.bind(self._prepare(ep))
                self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            self._peers.watch()
        except BaseException:
            await self.close()
            raise
        self._loops = [
            asyncio.create_task(self._recv_loop(), name="zmq-frontend-recv"),
            asyncio.create_task(self._peers.monitor_loop(), name="zmq-frontend-monitor"),
            asyncio.create_task(self._peers.probe_loop(), name="zmq-frontend-probe"),
        ]
        log.info("ZeroMQ protocol v%d on %s", PROTOCOL_VERSION, ", ".join(self.endpoints))
        return self

    def _prepare(self, ep: str) -> str:
        if ep == "ipc://":
            if self.runtime_dir is None:
                self.runtime_dir, self._own_dir = make_runtime_dir("tandem-zmq"), True
            return ipc_address(self.runtime_dir, "client")
        path = ipc_path(ep)
        if path is not None and path.exists():
            # libzmq would unlink the path and silently orphan a live server bound there.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(os.fspath(path))
                raise OSError(f"a server is already listening on {ep}")
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing stale ipc socket %s", path)
                remove_ipc_file(ep)
            finally:
                probe.close()
        return ep

    async def close(self) -> None:
        """Stop serving: requests in flight end with a 'shutting_down' error frame."""
        if self._closing:
            return
        self._closing = True
        for t in self._loops:
            t.cancel()
        for client in list(self._clients.values()):
            for req in list(client.requests.values()):
                req.cancel("shutdown")
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        deadline = time.monotonic() + 5.0
        while self._tasks and time.monotonic() < deadline:  # requests, then their terminal sends
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for t in list(self._tasks):
            t.cancel()
        if self._sock is not None:
            self._peers.detach()
            self._sock.close(linger=TERMINAL_LINGER_MS)
            self._sock = None
        for ep in self.endpoints:
            remove_ipc_file(ep)
        if self._own_dir and self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)
        if self._own_ctx:
            self._ctx.term()

    async def __aenter__(self) -> ZmqFrontend:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def model_name(self) -> str:
        return self.engine.cfg.model_name or Path(self.engine.cfg.model_path).name

    @property
    def inflight(self) -> int:
        return sum(len(c.requests) for c in self._clients.values())

    # -- receiving -----------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._handle(frames)
            except Exception:  # one bad frame must never stop the server
                log.exception("error handling a client frame")

    def _handle(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        envelope = len(rest) == 2 and rest[0] == b""
        client = self._clients.get(identity)
        if client is None or client.gone:  # gone: an old connection under a reused routing id
            client = Client(identity)
        client.envelope = envelope
        if not (envelope or len(rest) == 1):
            self._peers.reply(client, RequestError("", "invalid_request", "expected one payload frame"))
            return
        try:
            msg = decode(rest[-1])
        except MessageError as e:
            self._peers.reply(client, RequestError("", "invalid_request", str(e)))
            return
        if isinstance(msg, GenerateRequest):
            self._submit(client, msg)
        elif isinstance(msg, Cancel):
            req = client.requests.get(msg.request_id) if isinstance(msg.request_id, str) else None
            if req is not None:
                req.cancel("cancelled")
        elif isinstance(msg, ClientHello):
            self._hello(client, msg)
        elif isinstance(msg, HealthRequest):
            self._spawn(self._health(client, msg.query_id))
        else:
            self._peers.reply(client, RequestError("", "invalid_request", f"unexpected {type(msg).__name__}"))

    def _hello(self, client: Client, msg: ClientHello) -> None:
        e = self.engine
        self._peers.reply(client, ServerHello(
            PROTOCOL_VERSION, self.model_name, e.context_length, list(CAPABILITIES),
            e.tokenizer.vocab_size, self.max_inflight, self.max_msg_size, __version__,
        ))
        if msg.version != PROTOCOL_VERSION:
            log.warning("client %r speaks protocol v%s, we speak v%d", msg.client_name, msg.version,
                        PROTOCOL_VERSION)
            self._peers.reply(client, RequestError("", "unsupported_version",
                                                   f"client speaks protocol v{msg.version}, "
                                                   f"this server speaks v{PROTOCOL_VERSION}"))

    def _submit(self, client: Client, msg: GenerateRequest) -> None:
        rid = msg.request_id if isinstance(msg.request_id, str) else ""
        try:
            msg.validate(self.engine.tokenizer.vocab_size)
        except ValueError as e:
            self._peers.reply(client, RequestError(rid, "invalid_request", str(e)))
            return
        if rid in client.requests:
            # Not this request's terminal frame: the one in flight under this id still gets its own.
            clash = RequestError(rid, "invalid_request", f"request id {rid!r} is in flight")
            self._peers.reply(client, clash)
            return
        if len(client.requests) >= self.max_inflight:
            full = RequestError(rid, "busy", f"over {self.max_inflight} requests in flight")
            self._peers.reply(client, full)
            return
        req = ClientRequest(rid)
        client.requests[rid] = req
        self._clients[client.identity] = client
        req.task = self._spawn(self._run(client, req, msg))
        req.task.add_done_callback(lambda t: self._finish(client, req, t))

    # -- one request ---------------------------------------------------------------------
    async def _run(self, client: Client, req: ClientRequest, msg: GenerateRequest) -> None:
        ids = await asyncio.to_thread(self._tokenize, msg)
        if not ids:
            req.terminal = RequestError(req.rid, "invalid_request", "the prompt is empty")
            return
        req.prompt_tokens = len(ids)
        if not await self._peers.send(client, Accepted(req.rid, len(ids), ids)):
            return
        req.accepted = True
        if req.cancel_reason:  # cancelled while being tokenized
            return
        parts: list[TokenDelta] = []
        events = self.engine.generate(ids, msg.params, request_id=f"z{uuid.uuid4().hex}")
        try:
            # aclosing: leaving early closes the generator now, which cancels in the scheduler
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for ev in events:
                    if isinstance(ev, TokenDelta):
                        req.completion_tokens += len(ev.token_ids)
                        ev = dataclasses.replace(ev, request_id=req.rid)
                        if not msg.stream:
                            parts.append(ev)
                        elif not await self._peers.send(client, ev):
                            return
                    else:
                        if not msg.stream and not await self._peers.send(client, _merge(req.rid, parts)):
                            return
                        req.terminal = dataclasses.replace(ev, request_id=req.rid)
        except EngineError as e:
            req.terminal = RequestError(req.rid, e.code, str(e))

    def _tokenize(self, msg: GenerateRequest) -> list[int]:
        tok = self.engine.tokenizer
        if msg.prompt_token_ids is not None:
            return list(msg.prompt_token_ids)
        if msg.messages is not None:
            if not tok.chat_template:
                raise InvalidParameterError("messages", "this model has no chat template")
            return chat_ids(tok, [{"role": m.role, "content": m.content} for m in msg.messages])
        assert msg.prompt is not None
        return prompt_ids(tok, msg.prompt, raw=msg.raw, system=msg.system)

    def _finish(self, client: Client, req: ClientRequest, task: asyncio.Task[None]) -> None:
        client.requests.pop(req.rid, None)
        if not client.requests and self._clients.get(client.identity) is client:
            del self._clients[client.identity]
        terminal = req.terminal
        if task.cancelled() or terminal is None:
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, InvalidParameterError | ChatTemplateError | TokenizerError):
                terminal = RequestError(req.rid, "invalid_request", str(exc))
            elif exc is not None:
                log.error("request %s failed", req.rid, exc_info=exc)
                terminal = RequestError(req.rid, "internal", f"{type(exc).__name__}: {exc}")
            elif req.cancel_reason == "shutdown":
                terminal = RequestError(req.rid, "shutting_down", "server is shutting down")
            else:  # cancelled by the client, or a failed send (then nobody is there to tell)
                terminal = Finished(req.rid, "cancelled", req.prompt_tokens, req.completion_tokens)
        if not client.gone:
            self._spawn(self._peers.send(client, terminal))

    # -- health --------------------------------------------------------------------------
    async def _health(self, client: Client, query_id: int) -> None:
        e, stats, error = self.engine, None, self.engine.dead or ""
        if not error:
            try:
                stats = await e.stats(timeout=2.0)
            except (TimeoutError, EngineError) as exc:
                error = f"the scheduler did not answer: {exc or 'timeout'}"
        await self._peers.send(client, Health(
            query_id, "dead" if e.dead else "ok", self.model_name, error, time.time() - self.started_at,
            len(self._clients), self.inflight, stats,
        ))

    # -- tasks ---------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _merge(rid: str, parts: list[TokenDelta]) -> TokenDelta:
    """A non-streaming request's one TokenDelta: every part, in order."""
    out = TokenDelta(rid, [], "")
    for p in parts:
        out.token_ids += p.token_ids
        out.text += p.text
        for name in ("logprobs", "top_logprobs", "logits"):
            if getattr(p, name) is not None:
                setattr(out, name, (getattr(out, name) or []) + getattr(p, name))
    return out
