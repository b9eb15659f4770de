"""The engine client's sans-IO core: frames in and out, events per request, no sockets.

Requests are registered by `submit` and forgotten at their terminal event (`Finished` or
`RequestError`), so frames for a request nobody waits for any more are dropped here, once.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

from tandem.messages import (
    CancelRequest,
    Embedding,
    EmbedRequest,
    ErrorCode,
    Finished,
    OutputBatch,
    RequestError,
    SamplingParams,
    Stats,
    StatsRequest,
    StepTrace,
    SubmitRequest,
    TokenDelta,
    TraceRequest,
    decode,
    encode,
    merge_delta,
)
from tandem.validation import ContextError, InvalidParameterError, check_request

Event = TokenDelta | Embedding | Finished | RequestError


class EngineError(RuntimeError):
    def __init__(self, code: str, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s  # busy: the scheduler's estimate of the wait

    @classmethod
    def of(cls, err: RequestError) -> EngineError:
        return cls(err.code, err.message, err.retry_after_s)


@dataclass
class Completion:
    """A whole reply, merged from its deltas."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[list[list[float]]] | None = None
    logits: list[bytes] | None = None
    finished: Finished | None = None
    wall_s: float = 0.0
    prompt_logprobs: list[float] | None = None  # params.prompt_logprobs: prompt tokens 1.. (TokenDelta)
    prompt_top_logprobs: list[list[list[float]]] | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.finished.finish_reason if self.finished is not None else None

    def add(self, ev: TokenDelta | Finished) -> None:
        if isinstance(ev, TokenDelta):
            merge_delta(self, ev)
        else:
            self.finished = ev


@dataclass
class Routed:
    """What one frame from the scheduler meant: events of the requests we know, query answers."""

    events: list[tuple[str, Event]] = field(default_factory=list)
    replies: list[Stats | StepTrace] = field(default_factory=list)


class Router:
    def __init__(self, vocab_size: int = 0, context_length: int = 0) -> None:
        self.active: set[str] = set()
        self._qids = itertools.count(1)
        # The engine's, for tandem.validation: set once the engine has started.
        self.vocab_size = vocab_size
        self.context_length = context_length

    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        checked: bool = False,
    ) -> tuple[str, bytes]:
        """(request id, the frame that submits it); EngineError if the id is in flight, or if the
        request breaks a rule of tandem.validation. ``checked``: the caller applied those rules
        itself (the gateway's front ends, which name their own parameters), so they run once."""
        if not checked:
            assert self.vocab_size > 0 and self.context_length > 0, "the engine has not started"
            try:
                check_request(prompt_ids, params, self.vocab_size, self.context_length)
            except ContextError as e:
                raise EngineError(e.code, str(e)) from None
            except InvalidParameterError as e:
                raise EngineError(ErrorCode.INVALID_REQUEST, str(e)) from None
        rid = request_id or self.new_request_id()
        if rid in self.active:
            raise EngineError("invalid_request", f"request id {rid!r} is already in use")
        self.active.add(rid)
        return rid, encode(SubmitRequest(rid, list(prompt_ids), params, time.monotonic()))

    def embed(self, prompt_ids: list[int], request_id: str | None = None) -> tuple[str, bytes]:
        """(request id, the frame that submits an embedding): its events are one Embedding, then
        Finished (or a RequestError)."""
        rid = request_id or self.new_request_id()
        if rid in self.active:
            raise EngineError("invalid_request", f"request id {rid!r} is already in use")
        self.active.add(rid)
        return rid, encode(EmbedRequest(rid, list(prompt_ids), time.monotonic()))

    def cancel(self, request_id: str, reason: str = "cancelled") -> bytes | None:
        """The frame that cancels a request still in flight (None if it already ended)."""
        if request_id not in self.active:
            return None
        self.active.discard(request_id)
        return encode(CancelRequest(request_id, reason))

    def forget(self, request_id: str) -> None:
        """Stop routing a request's frames (its consumer is gone, or failed it locally)."""
        self.active.discard(request_id)

    def stats_query(self) -> tuple[int, bytes]:
        qid = next(self._qids)
        return qid, encode(StatsRequest(qid))

    def trace_query(self, since_step: int = 0) -> tuple[int, bytes]:
        qid = next(self._qids)
        return qid, encode(TraceRequest(qid, since_step))

    def feed(self, frame: bytes) -> Routed:
        msg = decode(frame)
        routed = Routed()
        if isinstance(msg, OutputBatch):
            active = self.active
            events = routed.events
            for d in msg.deltas:
                if d.request_id in active:
                    events.append((d.request_id, d))
            for v in msg.embeddings:
                if v.request_id in active:
                    events.append((v.request_id, v))
            for f in msg.finished:
                if f.request_id in active:
                    events.append((f.request_id, f))
                    active.discard(f.request_id)
            for e in msg.errors:
                if e.request_id in active:
                    events.append((e.request_id, e))
                    active.discard(e.request_id)
        elif isinstance(msg, Stats | StepTrace):
            routed.replies.append(msg)
        return routed
