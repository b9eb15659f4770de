"""The ZeroMQ client protocol (PROTOCOL.md) served on a ROUTER socket over an AsyncEngine.

Frames in are ``[identity, payload]`` (DEALER clients) or ``[identity, b"", payload]`` (clients
that send REQ-style envelopes; replies to them carry the empty delimiter too). Each request runs
in its own task; the task's done-callback, not its body, sends the terminal frame, so a request
cancelled before it ever ran still gets exactly one terminal frame. A failed send (ROUTER_MANDATORY
raises EHOSTUNREACH for a vanished peer) cancels everything that client had in flight; sending and
noticing vanished clients live in zmq_peers.py, reading frames that do not decode in zmq_frames.py.

Binding is separate from serving (`bind`, then `start`), so that `tandem serve` can claim its
ports before it spawns the engine: a busy port must fail the server before any model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from gguf import TokenType

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
from tandem.engine.aio import AsyncEngine
from tandem.engine.router import EngineError
from tandem.gateway.embed_limit import cut_input, max_embed_tokens
from tandem.gateway.zmq_frames import UnreadableFrame, read_frame, readable_id
from tandem.gateway.zmq_peers import SEND_TIMEOUT_S, Client, ClientRequest, Peers
from tandem.messages import (
    PROTOCOL_REVISION,
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    ChatMessage,
    ClientHello,
    EmbedInputRequest,
    ErrorCode,
    Finished,
    FinishReason,
    GenerateRequest,
    Health,
    HealthRequest,
    RequestError,
    ServerHello,
    TokenDelta,
    merge_delta,
)
from tandem.prompts.build import chat_ids, prompt_ids
from tandem.prompts.chat_template import ChatTemplateError
from tandem.tokenizer.build import TokenizerError
from tandem.tokenizer.tokenizer import Tokenizer
from tandem.tools.request import prompt_messages, read_tools
from tandem.validation import (
    ContextError,
    InvalidParameterError,
    check_prompt_ids,
    fit_context,
    validate_request,
)

log = logging.getLogger(__name__)

CAPABILITIES = [
    "stream",
    "cancel",
    "chat",
    "prompt_token_ids",
    "logprobs",
    "logits",
    "health",
    "structured_output",  # SamplingParams.grammar_kind / grammar (protocol revision 1.1)
    "tools",  # GenerateRequest.tools / tool_choice, Finished.tool_calls (1.1)
    "prompt_logprobs",  # SamplingParams.prompt_logprobs, TokenDelta.prompt_logprobs (1.2)
]
EMBEDDINGS = "embeddings"  # EmbedInputRequest (1.3): listed where the model embeds
TERMINAL_LINGER_MS = 500  # time at close for terminal frames still queued to reach their clients
MAX_ERROR_CHARS = 300  # error messages quote client values: never send back more than this


class ZmqFrontend:
    def __init__(
        self,
        engine: AsyncEngine,
        endpoints: list[str],
        zmq_ctx: zmq.asyncio.Context | None = None,
        max_msg_size: int = 16 * 2**20,
        max_inflight_per_client: int = 256,
        runtime_dir: Path | None = None,
        special_in_messages: bool = False,
        send_timeout: float = SEND_TIMEOUT_S,
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
        self.special_in_messages = special_in_messages  # see tandem.prompts.build.chat_ids
        self._ll_tok: object | None = None  # llguidance's view of the tokenizer, for grammar checks
        self._own_dir = False
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._peers = Peers(self._spawn, send_timeout)
        self._clients = self._peers.clients  # the clients with requests in flight, by identity
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        self.started_at = time.time()
        self.undecodable_frames = 0  # frames answered with an error whose request_id is empty
        self.on_undecodable: Callable[[], object] | None = None  # called once for each of them
        self._max_prompt_bytes = 0  # no prompt text longer than this can fit the context (set by start)

    # -- lifecycle -----------------------------------------------------------------------
    def bind(self) -> ZmqFrontend:
        """Bind every endpoint now (clients may connect; their frames wait until `start`).

        Raises zmq.ZMQError or OSError, with nothing left bound, when an endpoint cannot be had.
        """
        if self._sock is not None:
            return self
        sock = make_socket(self._ctx, zmq.ROUTER, linger_ms=DATA_LINGER_MS, max_msg_size=self.max_msg_size)
        self._sock = sock  # type: ignore[assignment]
        self._peers.attach(sock)  # type: ignore[arg-type]
        try:
            for ep in self.requested:
                if ep.startswith("tcp://["):
                    sock.setsockopt(zmq.IPV6, 1)
                sock.bind(self._prepare(ep))
                bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                if (path := ipc_path(bound)) is not None:
                    # Connecting takes write permission on the file: an explicit path outside our
                    # 0700 runtime dir must not let the umask's group or others in.
                    os.chmod(path, 0o600)
                self.endpoints.append(bound)
            self._peers.watch()
        except BaseException:
            self._release()
            raise
        return self

    async def start(self) -> ZmqFrontend:
        """Serve (binding first if `bind` was not called); the engine must be started."""
        self.bind()
        self._max_prompt_bytes = self.engine.context_length * longest_token_bytes(self.engine.tokenizer)
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
        self._release()
        if self._own_ctx:
            self._ctx.term()

    def _release(self) -> None:
        """Close the socket and remove the ipc files and the runtime directory this front end made."""
        if self._sock is not None:
            self._peers.detach()
            self._sock.close(linger=TERMINAL_LINGER_MS)
            self._sock = None
        for ep in self.endpoints:
            remove_ipc_file(ep)
        if self._own_dir and self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)
            self.runtime_dir, self._own_dir = None, False

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
            except Exception as e:  # one bad frame must never stop the server, nor go unanswered
                log.exception("error handling a client frame")
                client = Client(frames[0])
                client.envelope = len(frames) == 3 and frames[1] == b""
                self._refuse(client, "", ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _handle(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        envelope = len(rest) == 2 and rest[0] == b""
        client = self._clients.get(identity)
        if client is None or client.gone:  # gone: an old connection under a reused routing id
            client = Client(identity)
        client.envelope = envelope
        if not (envelope or len(rest) == 1):
            self._refuse(client, "", ErrorCode.INVALID_REQUEST, "expected one payload frame")
            return
        try:
            msg = read_frame(rest[-1])
        except UnreadableFrame as e:
            if (
                e.request_id and e.request_id in client.requests
            ):  # as in _submit: the request in flight keeps its terminal
                self._refuse(client, e.request_id, ErrorCode.INVALID_REQUEST, _in_flight(e.request_id))
            else:
                self._refuse(client, e.request_id, ErrorCode.INVALID_REQUEST, e.message)
            return
        if isinstance(msg, GenerateRequest | EmbedInputRequest):
            self._submit(client, msg)
        elif isinstance(msg, Cancel):
            self._cancel(client, msg)
        elif isinstance(msg, ClientHello):
            self._hello(client, msg)
        elif isinstance(msg, HealthRequest):  # decode has checked that query_id is an integer
            self._spawn(self._health(client, msg.query_id))
        else:
            self._refuse(client, "", ErrorCode.INVALID_REQUEST, f"unexpected {type(msg).__name__}")

    def _cancel(self, client: Client, msg: Cancel) -> None:
        if (req := client.requests.get(msg.request_id)) is not None:  # decode has checked it is a str
            req.cancel("cancelled")

    def _refuse(self, client: Client, rid: str, code: str, text: str) -> None:
        """Send an error frame; one with no request id is counted (`undecodable_frames`, /metrics)."""
        if not rid:
            self.undecodable_frames += 1
            if self.on_undecodable is not None:
                self.on_undecodable()
        self._peers.reply(client, RequestError(rid, code, _clip(text)))

    def _hello(self, client: Client, msg: ClientHello) -> None:
        e = self.engine
        self._peers.reply(
            client,
            ServerHello(
                PROTOCOL_VERSION,
                self.model_name,
                e.context_length,
                [*CAPABILITIES, *([EMBEDDINGS] if self._embeds else [])],
                e.tokenizer.vocab_size,
                self.max_inflight,
                self.max_msg_size,
                __version__,
                PROTOCOL_REVISION,
            ),
        )
        if msg.version != PROTOCOL_VERSION:
            version = _clip(repr(msg.version), 40)
            log.warning(
                "client %s speaks protocol v%s, we speak v%d",
                _clip(repr(msg.client_name), 80),
                version,
                PROTOCOL_VERSION,
            )
            self._peers.reply(
                client,
                RequestError(
                    "",
                    "unsupported_version",
                    f"client speaks protocol v{version}, this server speaks v{PROTOCOL_VERSION}",
                ),
            )

    @property
    def _embeds(self) -> bool:
        return bool((self.engine.ready_info.get("model") or {}).get("embeds"))

    def _submit(self, client: Client, msg: GenerateRequest | EmbedInputRequest) -> None:
        rid = readable_id(msg.request_id) or ""
        if rid in client.requests:
            # Not this request's terminal frame: the one in flight under this id still gets its own.
            self._refuse(client, rid, ErrorCode.INVALID_REQUEST, _in_flight(rid))
            return
        # Before validating, which walks every token id: a prompt far over the context costs nothing.
        too_long = self._over_context(msg) if isinstance(msg, GenerateRequest) else None
        if too_long:
            self._refuse(client, rid, ErrorCode.CONTEXT_LENGTH, too_long)
            return
        try:
            if isinstance(msg, GenerateRequest):
                validate_request(msg, self.engine.tokenizer.vocab_size)
            else:
                self._check_embed(msg)
        except ValueError as e:
            self._refuse(client, rid, ErrorCode.INVALID_REQUEST, str(e))
            return
        if len(client.requests) >= self.max_inflight:
            self._refuse(client, rid, ErrorCode.BUSY, f"over {self.max_inflight} requests in flight")
            return
        req = ClientRequest(rid)
        client.requests[rid] = req
        self._clients[client.identity] = client
        run = (
            self._run(client, req, msg) if isinstance(msg, GenerateRequest) else self._embed(client, req, msg)
        )
        req.task = self._spawn(run)
        req.task.add_done_callback(lambda t: self._finish(client, req, t))

    def _over_context(self, msg: GenerateRequest) -> str | None:
        """Why the prompt cannot fit the context, when its size alone proves it; None otherwise.

        Tokenizing holds the GIL, so megabytes of prompt would stall every client for seconds
        only to learn that. No token covers more than the vocabulary's longest token, so text
        longer than context x that many bytes cannot fit, whatever the template adds.
        """
        ctx = self.engine.context_length
        ids = msg.prompt_token_ids
        if isinstance(ids, list) and len(ids) >= ctx:
            try:
                fit_context(len(ids), None, ctx)
            except ContextError as e:
                return str(e)
        size = _text_bytes(msg)
        if size > self._max_prompt_bytes:
            per_token = self._max_prompt_bytes // max(ctx, 1)
            return (
                f"prompt is {size} bytes of text; a context of {ctx} tokens holds at most "
                f"{self._max_prompt_bytes} (no token of this model is longer than {per_token} bytes)"
            )
        return None

    # -- one request ---------------------------------------------------------------------
    async def _run(self, client: Client, req: ClientRequest, msg: GenerateRequest) -> None:
        ids = await asyncio.to_thread(self._tokenize, msg, req)
        try:
            fit_context(len(ids), msg.params.max_tokens, self.engine.context_length)
        except ContextError as e:
            req.terminal = RequestError(req.rid, e.code, str(e))
            return
        req.prompt_tokens = len(ids)
        if not await self._peers.send(client, Accepted(req.rid, len(ids), ids)):
            return
        req.accepted = True
        if req.cancel_reason:  # cancelled while being tokenized
            return
        parts: list[TokenDelta] = []
        # checked: _submit applied the request rules (params, token ids), and fit_context above.
        events = self.engine.generate(ids, msg.params, request_id=f"z{uuid.uuid4().hex}", checked=True)
        try:
            # aclosing: leaving early closes the generator now, which cancels in the scheduler
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for ev in events:
                    if isinstance(ev, TokenDelta):
                        req.completion_tokens += len(ev.token_ids)
                        if req.tools is not None:
                            req.text += ev.text
                        ev = msgspec.structs.replace(ev, request_id=req.rid)
                        if not msg.stream:
                            parts.append(ev)
                        elif not await self._peers.send(client, ev):
                            return
                    else:
                        if not msg.stream and not await self._peers.send(client, _merge(req.rid, parts)):
                            return
                        req.terminal = msgspec.structs.replace(ev, request_id=req.rid)
                        if req.tools is not None:
                            _, calls = req.tools.parse(req.text)
                            if calls:
                                req.terminal.tool_calls = [
                                    {"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls
                                ]
        except EngineError as e:
            # busy carries the scheduler's estimate of the wait, as HTTP's Retry-After does
            req.terminal = RequestError(req.rid, e.code, str(e), e.retry_after_s)

    def _check_embed(self, msg: EmbedInputRequest) -> None:
        if not 0 < len(msg.request_id) <= 256:
            raise InvalidParameterError("request_id", "must be a string of 1..256 chars")
        if (msg.prompt is None) == (msg.prompt_token_ids is None):
            raise InvalidParameterError("prompt", "give exactly one of prompt, prompt_token_ids")
        if msg.prompt_token_ids is not None:
            if not msg.prompt_token_ids:
                raise InvalidParameterError("prompt_token_ids", "must be a non-empty list of token ids")
            check_prompt_ids(msg.prompt_token_ids, self.engine.tokenizer.vocab_size)
        if not self._embeds:
            raise InvalidParameterError("model", f"model '{self.model_name}' does not support embeddings")

    async def _embed(self, client: Client, req: ClientRequest, msg: EmbedInputRequest) -> None:
        """Accepted, the Embedding, then Finished (as terminal); an input past the limit is cut, or
        with ``truncate`` false refused as context_length."""
        tok = self.engine.tokenizer
        if msg.prompt_token_ids is not None:
            ids = list(msg.prompt_token_ids)
        else:
            ids = await asyncio.to_thread(tok.encode, msg.prompt, parse_special=False)
        limit = max_embed_tokens(self.engine)
        if len(ids) > limit and not msg.truncate:
            text = f"input is {len(ids)} tokens, longer than the {limit} tokens the model embeds"
            text += " (truncate is false)"
            req.terminal = RequestError(req.rid, ErrorCode.CONTEXT_LENGTH, text)
            return
        ids = cut_input(ids, limit, tok)
        req.prompt_tokens = len(ids)
        if not await self._peers.send(client, Accepted(req.rid, len(ids), ids)):
            return
        req.accepted = True
        if req.cancel_reason:  # cancelled while being tokenized
            return
        try:
            vec, fin = await self.engine.embed(ids, request_id=f"z{uuid.uuid4().hex}")
        except EngineError as e:
            req.terminal = RequestError(req.rid, e.code, str(e))
            return
        if await self._peers.send(client, msgspec.structs.replace(vec, request_id=req.rid)):
            req.terminal = msgspec.structs.replace(fin, request_id=req.rid)

    def _check_grammar(self, msg: GenerateRequest) -> None:
        """A grammar the worker could not compile is this request's invalid_request, now."""
        p = msg.params
        if not p.grammar_kind:
            return
        from tandem.grammar.compile import GrammarError, check
        from tandem.grammar.tokenizer import ll_tokenizer

        if self._ll_tok is None:  # built once, in this worker thread (a second build is harmless)
            self._ll_tok = ll_tokenizer(self.engine.tokenizer)
        try:
            check(p.grammar_kind, p.grammar, self._ll_tok)
        except GrammarError as e:
            raise InvalidParameterError("grammar", str(e)) from None

    def _tokenize(self, msg: GenerateRequest, req: ClientRequest | None = None) -> list[int]:
        tok = self.engine.tokenizer
        tools = None
        if msg.tools:
            tools = read_tools({"tools": msg.tools, "tool_choice": msg.tool_choice}, tok.chat_template)
            forced = tools.grammar() if tools is not None else None
            if forced is not None:
                if msg.params.grammar_kind:
                    raise InvalidParameterError("tool_choice", "cannot be combined with a grammar")
                msg.params.grammar_kind, msg.params.grammar = forced
            if req is not None:
                req.tools = tools
        self._check_grammar(msg)
        if msg.prompt_token_ids is not None:
            return list(msg.prompt_token_ids)
        if msg.messages is not None:
            if not tok.chat_template:
                raise InvalidParameterError("messages", "this model has no chat template")
            messages = [_chat_dict(m) for m in msg.messages]
            messages, template_kwargs = prompt_messages(messages, tools, tok.chat_template)
            return chat_ids(tok, messages, self.special_in_messages, **template_kwargs)
        assert msg.prompt is not None
        return prompt_ids(tok, msg.prompt, msg.raw, msg.system, self.special_in_messages)

    def _finish(self, client: Client, req: ClientRequest, task: asyncio.Task[None]) -> None:
        client.requests.pop(req.rid, None)
        if not client.requests and self._clients.get(client.identity) is client:
            del self._clients[client.identity]
        terminal = req.terminal
        if task.cancelled() or terminal is None:
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, InvalidParameterError | ChatTemplateError | TokenizerError):
                terminal = RequestError(req.rid, ErrorCode.INVALID_REQUEST, _clip(str(exc)))
            elif exc is not None:
                log.error("request %s failed", req.rid, exc_info=exc)
                terminal = RequestError(req.rid, ErrorCode.INTERNAL, _clip(f"{type(exc).__name__}: {exc}"))
            elif req.cancel_reason == "shutdown":
                terminal = RequestError(req.rid, ErrorCode.SHUTTING_DOWN, "server is shutting down")
            else:  # cancelled by the client, or a failed send (then nobody is there to tell)
                terminal = Finished(req.rid, FinishReason.CANCELLED, req.prompt_tokens, req.completion_tokens)
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
        status = "dead" if e.dead else "degraded" if stats is not None and stats.step_overdue_s > 0 else "ok"
        await self._peers.send(
            client,
            Health(
                query_id,
                status,
                self.model_name,
                error,
                time.time() - self.started_at,
                len(self._clients),
                self.inflight,
                stats,
            ),
        )

    # -- tasks ---------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most bytes of text one token can stand for: the bytes it decodes to, or for a token that
    is not NORMAL (control, user-defined: matched in the text as spelled) its spelling, if longer."""
    longest = 0
    for i in range(tokenizer.vocab_size):
        n = len(tokenizer.token_bytes(i))
        if tokenizer.token_type(i) != TokenType.NORMAL:
            n = max(n, len(tokenizer.id_to_piece(i).encode("utf-8", "replace")))
        longest = max(longest, n)
    return longest


def _chat_dict(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _text_bytes(msg: GenerateRequest) -> int:
    """UTF-8 bytes of all the text a request asks to tokenize (fields of the wrong type count 0)."""
    texts = [msg.prompt, msg.system]
    if isinstance(msg.messages, list):
        texts += [part for m in msg.messages if isinstance(m, ChatMessage) for part in (m.role, m.content)]
    return sum(len(t.encode("utf-8")) for t in texts if isinstance(t, str))


def _in_flight(rid: str) -> str:
    return f"request id {rid!r} is in flight"


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def _merge(rid: str, parts: list[TokenDelta]) -> TokenDelta:
    """A non-streaming request's one TokenDelta: every part, in order."""
    out = TokenDelta(rid, [], "")
    for p in parts:
        merge_delta(out, p)
    return out
