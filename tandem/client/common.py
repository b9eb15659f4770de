"""What the sync and async clients share: errors, results, request building, one request's state."""

from __future__ import annotations

import array
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from tandem.actors.sockets import make_socket
from tandem.messages import (
    PROTOCOL_VERSION,
    Accepted,
    ChatMessage,
    Embedding,
    ErrorCode,
    Finished,
    GenerateRequest,
    RequestError,
    SamplingParams,
    ServerHello,
    TokenDelta,
    merge_delta,
)

DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
class TandemError(Exception):
    """An error frame from the server (or a client-side failure with the same shape)."""

    def __init__(self, code: str, message: str, request_id: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        # busy: the server's estimate of the seconds until its queue has room (0 when it gave none)
        self.retry_after_s = retry_after_s


class InvalidRequestError(TandemError, ValueError):
    @property
    def param(self) -> str | None:
        """The parameter the server named, when it named one."""
        m = re.search(r"invalid parameter '([^']+)'", self.message)
        return m.group(1) if m else None


class ServerBusyError(TandemError):
    pass


class ContextLengthError(TandemError, ValueError):
    pass


class WorkerDiedError(TandemError):
    pass


class ShuttingDownError(TandemError):
    pass


class TandemTimeout(TandemError, TimeoutError):
    pass


class TandemConnectionError(TandemError, ConnectionError):
    pass


class ProtocolVersionError(TandemError):
    pass


_BY_CODE: dict[str, type[TandemError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.BUSY: ServerBusyError,
    ErrorCode.CONTEXT_LENGTH: ContextLengthError,
    ErrorCode.WORKER_DIED: WorkerDiedError,
    ErrorCode.SHUTTING_DOWN: ShuttingDownError,
    ErrorCode.TIMEOUT: TandemTimeout,
    "disconnected": TandemConnectionError,
    "unsupported_version": ProtocolVersionError,
}


def error_from(frame: RequestError) -> TandemError:
    return _BY_CODE.get(frame.code, TandemError)(
        frame.code, frame.message, frame.request_id, frame.retry_after_s
    )


def check_hello(hello: ServerHello, url: str) -> ServerHello:
    if hello.version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            "unsupported_version",
            f"the server at {url} speaks tandem protocol v{hello.version}, this client speaks "
            f"v{PROTOCOL_VERSION}; use a client and server of the same major version",
        )
    return hello


# --------------------------------------------------------------------------------------
# requests and results
# --------------------------------------------------------------------------------------
@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "context"
    stop_reason: str | int | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)  # prompt/completion/cached tokens
    timings: dict[str, float] = field(default_factory=dict)  # queued/prefill/decode/total seconds
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None
    logits: list[bytes] | None = None
    prompt_logprobs: list[float] | None = None  # params.prompt_logprobs: prompt tokens 1.. (TokenDelta)
    prompt_top_logprobs: list[list[list[float]]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # [{id, name, arguments}] for a request with tools


@dataclass
class EmbeddingResult:
    """One input's embedding (protocol 1.3): the vector, the tokens embedded (after any cut) and
    the Finished frame (prompt_tokens, timings)."""

    request_id: str
    vector: list[float]
    prompt_token_ids: list[int]
    finished: Finished


class EmbedState:
    """One embedding request seen from the client (protocol 1.3): feed it its frames (Accepted,
    Embedding, Finished); the Finished returns the result, an error frame raises TandemError."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.ids: list[int] = []
        self.vector: list[float] | None = None
        self.done = False

    def feed(self, msg: Any) -> EmbeddingResult | None:
        if isinstance(msg, RequestError):
            self.done = True
            raise error_from(msg)
        if isinstance(msg, Accepted):
            self.ids = list(msg.prompt_token_ids)
        elif isinstance(msg, Embedding):
            v = array.array("f", msg.vector)  # float32, little-endian on the wire
            if sys.byteorder != "little":
                v.byteswap()
            self.vector = v.tolist()
        elif isinstance(msg, Finished):
            self.done = True
            if self.vector is None:
                raise TandemError(
                    ErrorCode.INTERNAL, "the embedding finished without a vector", self.request_id
                )
            return EmbeddingResult(self.request_id, self.vector, self.ids, msg)
        return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_request(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: list[int] | None,
    messages: list[Any] | None,
    raw: bool,
    system: str | None,
    stream: bool,
    sampling: dict[str, Any],
) -> GenerateRequest:
    """``sampling``: SamplingParams fields by name, or ``params=SamplingParams(...)``; also
    ``tools`` and ``tool_choice`` (OpenAI's shapes) for a chat."""
    tools = sampling.pop("tools", None)
    tool_choice = sampling.pop("tool_choice", None)
    params = sampling.pop("params", None)
    if params is None:
        params = SamplingParams(**sampling)  # an unknown name is a TypeError right here
    elif sampling:
        raise TypeError(f"give params= or sampling keywords, not both ({sorted(sampling)})")
    msgs = None
    if messages is not None:
        msgs = [
            m
            if isinstance(m, ChatMessage)
            else ChatMessage(m["role"], m.get("content") or "", m.get("tool_calls"), m.get("tool_call_id"))
            for m in messages
        ]
    return GenerateRequest(
        request_id,
        prompt,
        list(prompt_token_ids) if prompt_token_ids is not None else None,
        msgs,
        raw,
        system,
        params,
        stream,
        tools,
        tool_choice,
    )


class RequestState:
    """One request seen from the client: feed it frames; it yields deltas and raises on errors."""

    def __init__(self, request_id: str, collect: bool) -> None:
        self.request_id = request_id
        self.collect = collect
        self.accepted: Accepted | None = None
        self.finished: Finished | None = None
        self.done = False
        self.started = time.perf_counter()
        self.completion = Completion(request_id)

    def feed(self, msg: Any) -> TokenDelta | None:
        """The delta to hand the user, or None; raises TandemError for an error frame."""
        if isinstance(msg, RequestError):
            self.done = True
            raise error_from(msg)
        if isinstance(msg, Accepted):
            self.accepted = msg
            self.completion.prompt_token_ids = list(msg.prompt_token_ids)
        elif isinstance(msg, TokenDelta):
            if self.collect:
                merge_delta(self.completion, msg)
            return msg
        elif isinstance(msg, Finished):
            self.done = True
            self.finished = msg
            c = self.completion
            c.finish_reason, c.stop_reason = msg.finish_reason, msg.stop_reason
            c.tool_calls = msg.tool_calls
            c.usage = {
                "prompt_tokens": msg.prompt_tokens,
                "completion_tokens": msg.completion_tokens,
                "cached_tokens": msg.cached_tokens,
            }
            c.timings = {
                "queued_s": msg.queued_s,
                "prefill_s": msg.prefill_s,
                "decode_s": msg.decode_s,
                "total_s": time.perf_counter() - self.started,
            }
        return None


def timeout_error(request_id: str, timeout: float) -> TandemTimeout:
    return TandemTimeout(
        ErrorCode.TIMEOUT, f"no reply for request {request_id} within {timeout} s (cancelled)", request_id
    )


def disconnected(request_id: str, url: str) -> RequestError:
    return RequestError(request_id, "disconnected", f"lost the connection to {url}; the request is lost")


# --------------------------------------------------------------------------------------
# sockets
# --------------------------------------------------------------------------------------
def normalize_url(url: str) -> str:
    """``tcp://HOST:PORT``, ``ipc://PATH``, or a bare socket path (taken as ipc)."""
    if "://" in url:
        if not url.startswith(("tcp://", "ipc://")):
            raise ValueError(f"unsupported url {url!r}: use tcp://HOST:PORT or ipc://PATH")
        return url
    return f"ipc://{os.path.abspath(url)}"


def client_socket(ctx: zmq.Context, url: str) -> tuple[zmq.Socket, zmq.Socket]:
    """A connected DEALER (heartbeats on, so a hung server shows as a disconnect) and its monitor."""
    sock = make_socket(ctx, zmq.DEALER, linger_ms=100)  # time for a last Cancel to leave
    try:
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(url)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock, monitor


def is_disconnect(frames: list[bytes]) -> bool:
    return parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED


def close_sockets(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    if not sock.closed:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
        sock.close(linger=0)
