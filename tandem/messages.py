"""Every message that crosses a process boundary, as typed dataclasses with one msgpack codec.

Wire form: ``[tag, field0, field1, ...]`` in declaration order. New fields are only ever
appended with defaults, so a peer one version behind decodes what it knows and ignores the
rest (PROTOCOL.md, "Versioning"). Tensors travel as raw bytes plus dtype/shape or in the
shared-memory ring, never as lists of floats.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args, get_origin

import msgpack

PROTOCOL_VERSION = 1

_REGISTRY: dict[int, type] = {}
_DECODERS: dict[type, list[Any]] = {}
_ENCODERS: dict[type, Callable[[Any], Any]] = {}
_BUILDERS: dict[type, Callable[[list[Any]], Any]] = {}
T = TypeVar("T")


class MessageError(ValueError):
    """A frame that does not decode into a known message."""


def message(tag: int):
    def wrap(cls: type[T]) -> type[T]:
        if tag in _REGISTRY:
            raise RuntimeError(f"message tag {tag} used twice ({_REGISTRY[tag].__name__}, {cls.__name__})")
        cls = dataclass(cls)  # type: ignore[assignment]
        cls.TAG = tag  # type: ignore[attr-defined]
        _REGISTRY[tag] = cls
        return cls

    return wrap


def _to_wire(value: Any) -> Any:
    """A message as the sequence of its field values (msgpack packs a tuple as the same array as
    a list); only fields typed as messages recurse (msgpack packs lists of numbers and strings
    itself, and a step's 256 deltas must be cheap)."""
    enc = _ENCODERS.get(type(value))
    if enc is None:
        enc = _encoder(type(value))
    return enc(value)


def _encoder(cls: type) -> Callable[[Any], Any]:
    """The function that turns a ``cls`` message into its field values, built once per class:
    one C-level attrgetter call for the fields, a Python loop only over message-typed ones."""
    fields = _decoders(cls)
    names = [name for name, _ in fields]
    if len(names) == 1:
        one = operator.attrgetter(names[0])

        def get(value: Any) -> tuple:
            return (one(value),)

    elif names:
        get = operator.attrgetter(*names)
    else:

        def get(value: Any) -> tuple:
            return ()

    nested = [(i, *spec) for i, (_, spec) in enumerate(fields) if spec is not None]
    if not nested:
        enc = get
    else:

        def enc(value: Any) -> Any:
            out = list(get(value))
            for i, kind, sub in nested:
                v = out[i]
                if v is None:
                    continue
                if kind == "list":
                    sub_enc = _ENCODERS.get(sub) or _encoder(sub)
                    out[i] = [sub_enc(x) if type(x) is sub else _to_wire(x) for x in v]
                else:
                    out[i] = _to_wire(v)
            return out

    _ENCODERS[cls] = enc
    return enc


def encode(msg: Any) -> bytes:
    return msgpack.packb([msg.TAG, *_to_wire(msg)], use_bin_type=True)


def _nested_type(hint: Any) -> tuple[str, type] | None:
    """('one' | 'list', cls) when a field holds message dataclasses that need rebuilding."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(hint):
            found = _nested_type(arg)
            if found:
                return found
        return None
    if origin is list:
        (arg,) = get_args(hint) or (Any,)
        if isinstance(arg, type) and hasattr(arg, "TAG"):
            return ("list", arg)
        return None
    if isinstance(hint, type) and hasattr(hint, "TAG"):
        return ("one", hint)
    return None


def _decoders(cls: type) -> list[Any]:
    if cls not in _DECODERS:
        hints = typing.get_type_hints(cls)
        _DECODERS[cls] = [(f.name, _nested_type(hints[f.name])) for f in dataclasses.fields(cls)]
    return _DECODERS[cls]


def _from_wire(cls: type[T], values: list[Any]) -> T:
    if type(values) is not list:  # malformed (a map, a string...): read the way it always was
        return _from_iterable(cls, values)
    dec = _BUILDERS.get(cls)
    if dec is None:
        dec = _builder(cls)
    return dec(values)


def _from_iterable(cls: type[T], values: Any) -> T:
    kwargs = {}
    for (name, nested), value in zip(_decoders(cls), values, strict=False):
        if nested is not None and value is not None:
            kind, sub = nested
            value = [_from_wire(sub, v) for v in value] if kind == "list" else _from_wire(sub, value)
        kwargs[name] = value
    return cls(**kwargs)


def _builder(cls: type[T]) -> Callable[[list[Any]], T]:
    """The function that rebuilds a ``cls`` message from its field values, made once per class.
    Values past the fields this version knows are ignored (a newer peer's appended fields); fields
    a shorter list lacks take their defaults. Fields are passed by position, in declaration order."""
    fields = _decoders(cls)
    n = len(fields)
    nested = [(i, *spec) for i, (_, spec) in enumerate(fields) if spec is not None]
    if not nested:

        def build(values: list[Any]) -> T:
            return cls(*values[:n])

    else:

        def build(values: list[Any]) -> T:
            values = values[:n]
            for i, kind, sub in nested:
                if i < len(values) and values[i] is not None:
                    v = values[i]
                    values[i] = [_from_wire(sub, x) for x in v] if kind == "list" else _from_wire(sub, v)
            return cls(*values)

    _BUILDERS[cls] = build
    return build


def decode(data: bytes) -> Any:
    try:
        arr = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(arr, list) or not arr or not isinstance(arr[0], int):
        raise MessageError("frame is not a tandem message (expected [tag, ...fields])")
    cls = _REGISTRY.get(arr[0])
    if cls is None:
        raise MessageError(f"unknown message tag {arr[0]}")
    try:
        return _from_wire(cls, arr[1:])
    except TypeError as exc:
        raise MessageError(f"malformed {cls.__name__}: {exc}") from None


# --------------------------------------------------------------------------------------
# Actor control (any actor -> its parent, parent -> actor)
# --------------------------------------------------------------------------------------
@message(1)
class Ready:
    name: str
    pid: int
    version: int = PROTOCOL_VERSION
    info: dict[str, Any] = field(default_factory=dict)


@message(2)
class Heartbeat:
    name: str
    pid: int
    time: float


@message(3)
class ActorFailed:
    name: str
    pid: int
    error: str
    traceback: str = ""


@message(4)
class Stop:
    reason: str = ""
    drain: bool = False


# --------------------------------------------------------------------------------------
# Requests and their results (client <-> gateway <-> scheduler)
# --------------------------------------------------------------------------------------
class ErrorCode(enum.StrEnum):
    """`RequestError.code`: why a request ended without finishing (PROTOCOL.md, section 5)."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH = "context_length"
    BUSY = "busy"
    WORKER_DIED = "worker_died"
    SHUTTING_DOWN = "shutting_down"
    CANCELLED = "cancelled"  # by the server: its client stopped reading
    TIMEOUT = "timeout"  # client side: no reply in time
    INTERNAL = "internal"


class FinishReason(enum.StrEnum):
    """`Finished.finish_reason`."""

    STOP = "stop"  # EOS, a stop string or a stop token
    LENGTH = "length"  # max_tokens
    CONTEXT = "context"  # the context (or the KV pool) is full
    CANCELLED = "cancelled"


class InvalidParameterError(ValueError):
    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"invalid parameter '{param}': {reason}")
        self.param = param


def _finite(
    name: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidParameterError(name, f"must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise InvalidParameterError(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidParameterError(name, f"must be <= {hi}, got {v}")


def _int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidParameterError(name, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise InvalidParameterError(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidParameterError(name, f"must be <= {hi}, got {v}")


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise InvalidParameterError(name, f"must be true or false, got {v!r}")


def _text(name: str, v: Any) -> None:
    if not isinstance(v, str):
        raise InvalidParameterError(name, f"must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameterError(name, "is not valid Unicode (lone surrogate)") from None


INT32_MAX = 2**31 - 1


@message(10)
class SamplingParams:
    max_tokens: int | None = None  # None: until EOS or the context is full
    temperature: float = 1.0
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: sampled token only; n: plus top-n
    return_logits: bool = False  # full logits row of every generated position (debugging, evals)
    skip_special_tokens: bool = True
    # Structured output: one of GRAMMAR_KINDS ("" = unconstrained) and its source text (a JSON
    # schema as JSON text, a regex, a Lark or GBNF grammar; ignored for "json").
    grammar_kind: str = ""
    grammar: str = ""

    # Every bound is one the ring's column can hold (int32 counts and top_k, float32 knobs, 64-bit
    # seeds), so a request that passes here can never fail while its step is packed. The stop
    # caps keep one request from slowing every other one's detokenization (each stop string is
    # searched for after every token).
    MAX_TOP_LOGPROBS: typing.ClassVar[int] = 20
    MAX_TEMPERATURE: typing.ClassVar[float] = 100.0
    MAX_REPETITION_PENALTY: typing.ClassVar[float] = 100.0
    MAX_STOP: typing.ClassVar[int] = 16
    MAX_STOP_CHARS: typing.ClassVar[int] = 4096
    MAX_STOP_TOKEN_IDS: typing.ClassVar[int] = 64
    GRAMMAR_KINDS: typing.ClassVar[tuple[str, ...]] = ("", "json", "json_schema", "regex", "lark", "gbnf")
    MAX_GRAMMAR_CHARS: typing.ClassVar[int] = 1 << 20

    def validate(self) -> None:
        """Raise InvalidParameterError naming the first bad field."""
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, INT32_MAX)
        _finite("temperature", self.temperature, 0.0, self.MAX_TEMPERATURE)
        _int("top_k", self.top_k, -INT32_MAX - 1, INT32_MAX)
        _finite("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _finite("min_p", self.min_p, 0.0, 1.0)
        _finite("repetition_penalty", self.repetition_penalty, 0.0, self.MAX_REPETITION_PENALTY, lo_open=True)
        _finite("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _int("seed", self.seed, -(2**63), 2**64 - 1)
        self._validate_stops()
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, self.MAX_TOP_LOGPROBS)
        _bool("ignore_eos", self.ignore_eos)
        _bool("return_logits", self.return_logits)
        _bool("skip_special_tokens", self.skip_special_tokens)
        if self.grammar_kind not in self.GRAMMAR_KINDS:
            raise InvalidParameterError("grammar_kind", f"must be one of {self.GRAMMAR_KINDS}")
        _text("grammar", self.grammar)
        if len(self.grammar) > self.MAX_GRAMMAR_CHARS:
            raise InvalidParameterError("grammar", f"longer than {self.MAX_GRAMMAR_CHARS} characters")
        if self.grammar_kind not in ("", "json") and not self.grammar:
            raise InvalidParameterError("grammar", f"grammar_kind {self.grammar_kind!r} needs a grammar")

    def _validate_stops(self) -> None:
        if not isinstance(self.stop, list):
            raise InvalidParameterError("stop", "must be a list of non-empty strings")
        if len(self.stop) > self.MAX_STOP:
            raise InvalidParameterError("stop", f"at most {self.MAX_STOP} stop strings, got {len(self.stop)}")
        for s in self.stop:
            _text("stop", s)
            if not s:
                raise InvalidParameterError("stop", "must be a list of non-empty strings")
        total = sum(map(len, self.stop))
        if total > self.MAX_STOP_CHARS:
            raise InvalidParameterError(
                "stop", f"stop strings total {total} characters, more than the limit of {self.MAX_STOP_CHARS}"
            )
        ids = self.stop_token_ids
        if not isinstance(ids, list):
            raise InvalidParameterError("stop_token_ids", "must be a list of token ids")
        if len(ids) > self.MAX_STOP_TOKEN_IDS:
            raise InvalidParameterError(
                "stop_token_ids", f"at most {self.MAX_STOP_TOKEN_IDS} stop token ids, got {len(ids)}"
            )
        for t in ids:
            _int("stop_token_ids", t, 0, INT32_MAX)


@message(11)
class SubmitRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0


@message(12)
class CancelRequest:
    request_id: str
    reason: str = "cancelled"


@message(13)
class TokenDelta:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    # per token: [[id, logprob], ...] best first
    top_logprobs: list[list[list[float]]] | None = None
    logits: list[bytes] | None = None  # per token: float32 row of the vocabulary


def merge_delta(into: Any, d: TokenDelta) -> None:
    """Append delta ``d`` to ``into`` (a TokenDelta, or a reply with the same five fields): the
    one merge of deltas that every non-streaming reply is built with."""
    into.token_ids += d.token_ids
    into.text += d.text
    for name in ("logprobs", "top_logprobs", "logits"):
        extra = getattr(d, name)
        if extra is not None:
            setattr(into, name, (getattr(into, name) or []) + extra)


@message(14)
class Finished:
    request_id: str
    finish_reason: str  # a FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_reason: str | int | None = None  # the stop string or token id that matched
    queued_s: float = 0.0
    prefill_s: float = 0.0  # admission -> first token
    decode_s: float = 0.0  # first token -> finish
    # ZeroMQ (1.1): calls found in the reply of a request with tools: [{id, name, arguments}]
    tool_calls: list[dict[str, Any]] | None = None


@message(15)
class RequestError:
    request_id: str
    code: str  # an ErrorCode
    message: str
    retry_after_s: float = 0.0  # busy: the scheduler's estimate of the wait until the queue has room


@message(16)
class OutputBatch:
    """Everything one scheduler step produced: one frame instead of one per request."""

    deltas: list[TokenDelta] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)


@message(17)
class StatsRequest:
    query_id: int = 0


@message(18)
class Stats:
    query_id: int
    worker_alive: bool
    waiting: int
    running: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    block_size: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    steps: int
    prompt_tokens_total: int
    generated_tokens_total: int
    preemptions: int
    overlap: bool
    step_time_ms_avg: float
    gpu_idle_ms_avg: float
    memory_plan: dict[str, Any] = field(default_factory=dict)
    max_queue: int = 0
    worker_restarts: int = 0
    step_overdue_s: float = 0.0  # how far the oldest step in flight is past due (0: on time)
    grammar_ms_total: float = 0.0  # worker host time on grammar matchers, all steps
    grammar_rows_total: int = 0  # constrained rows masked, all steps


@message(19)
class TraceRequest:
    """Ask the scheduler for its recorded step timings (serve --trace-steps) from ``since_step`` on."""

    query_id: int = 0
    since_step: int = 0


@message(20)
class StepTrace:
    """Per-step timings, one row per step in STEP_TRACE_FIELDS order (time.monotonic_ns() of
    this machine, shared by the scheduler and the worker); ``enabled`` False when tracing is off."""

    query_id: int
    enabled: bool
    capacity: int = 0
    scheduler_pid: int = 0
    worker_pid: int = 0
    steps: list[list[int]] = field(default_factory=list)


STEP_TRACE_FIELDS = (
    "step",
    "num_seqs",
    "num_tokens",
    "prep_start_ns",  # the scheduler starts scheduling the step
    "prep_end_ns",  # its slot is packed
    "sent_ns",  # its doorbell is sent
    "worker_start_ns",  # the worker starts the step (doorbell read)
    "worker_end_ns",  # the worker has the step's results on the host
    "result_start_ns",  # the scheduler starts applying the results
    "result_end_ns",  # ... and is done with them (tokens, detokenizer, stop checks)
)


# --------------------------------------------------------------------------------------
# Scheduler <-> GPU worker
# --------------------------------------------------------------------------------------
@message(30)
class Doorbell:
    """Step ``step`` is in ring slot ``slot``; the worker may read it now."""

    step: int
    slot: int
    num_tokens: int
    num_seqs: int
    max_top_logprobs: int = 0
    any_penalties: bool = False
    all_greedy: bool = False
    want_logits: bool = False
    any_grammar: bool = False  # some row carries a grammar_id: its logits are masked before sampling


@message(31)
class StepResult:
    """Sampled tokens of one step, one row per sequence that sampled, plus the slot's credit."""

    step: int
    slot: int
    num_sampled: int
    token_ids: bytes  # int64[num_sampled]
    logprobs: bytes  # float32[num_sampled]
    top_k: int = 0
    top_ids: bytes = b""  # int64[num_sampled, top_k]
    top_logprobs: bytes = b""  # float32[num_sampled, top_k]
    logits: bytes = b""  # float32[num_sampled, vocab] when asked
    vocab_size: int = 0
    forward_ms: float = 0.0
    idle_ms: float = 0.0  # time the device waited for this step's doorbell
    error: str = ""
    t_start_ns: int = 0  # time.monotonic_ns() when the worker took the step up
    t_end_ns: int = 0  # ... and when its results were ready to post
    grammar_ms: float = 0.0  # host time spent on grammar matchers (advance + mask) in this step
    grammar_rows: int = 0  # constrained rows masked in this step


@message(32)
class GrammarSpec:
    """Scheduler -> worker, on the doorbell channel before the first step that uses it: the
    grammar that ring rows with ``grammar_id`` follow (kinds as SamplingParams.grammar_kind)."""

    grammar_id: int
    kind: str
    text: str


@message(33)
class GrammarRelease:
    """Scheduler -> worker: no sequence uses ``grammar_id`` any more (sent after its last step)."""

    grammar_id: int


# --------------------------------------------------------------------------------------
# ZeroMQ client protocol (client DEALER <-> gateway ROUTER); see PROTOCOL.md. Tags 50-69.
# --------------------------------------------------------------------------------------
MAX_REQUEST_ID_LEN = 256


@message(50)
class ClientHello:
    version: int  # the client's PROTOCOL_VERSION (major: a mismatch is refused)
    client_name: str = ""


@message(51)
class ServerHello:
    version: int
    model: str
    context_length: int
    capabilities: list[str] = field(default_factory=list)
    vocab_size: int = 0
    max_inflight: int = 0  # per connection
    max_msg_size: int = 0  # bytes; a larger frame drops the connection
    server_version: str = ""


@message(52)
class ChatMessage:
    role: str
    content: str
    # 1.1: an assistant turn's calls ([{id, type, function: {name, arguments}}]) and a tool
    # result's call id
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


@message(53)
class GenerateRequest:
    request_id: str  # chosen by the client, unique among its requests in flight
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    raw: bool = False  # prompt only: skip the chat template
    system: str | None = None  # prompt only: system message for the chat template
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = True  # False: one TokenDelta with everything, then the terminal frame
    # 1.1: OpenAI-shaped tools and tool_choice ("auto", "none", "required", {"type": "function",
    # "function": {"name": ...}}); messages only
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidParameterError naming the first bad field (request_id is checked first)."""
        rid = self.request_id
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID_LEN:
            raise InvalidParameterError("request_id", f"must be a string of 1..{MAX_REQUEST_ID_LEN} chars")
        given = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidParameterError(
                "prompt", f"give exactly one of prompt, prompt_token_ids, messages (got {given or 'none'})"
            )
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidParameterError("prompt", "must be a string")
        if self.prompt_token_ids is not None:
            ids = self.prompt_token_ids
            if not isinstance(ids, list) or not ids:
                raise InvalidParameterError("prompt_token_ids", "must be a non-empty list of token ids")
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise InvalidParameterError("prompt_token_ids", f"not a token id: {t!r}")
                if vocab_size is not None and t >= vocab_size:
                    raise InvalidParameterError(
                        "prompt_token_ids", f"token id {t} is outside the vocabulary (0..{vocab_size - 1})"
                    )
        if self.messages is not None:
            if not isinstance(self.messages, list) or not self.messages:
                raise InvalidParameterError("messages", "must be a non-empty list of chat messages")
            for m in self.messages:
                if not isinstance(m, ChatMessage) or not isinstance(m.role, str) or not m.role:
                    raise InvalidParameterError("messages", "each message needs a non-empty string role")
                if not isinstance(m.content, str):
                    raise InvalidParameterError("messages", "each message content must be a string")
        if not isinstance(self.raw, bool):
            raise InvalidParameterError("raw", "must be a boolean")
        if self.raw and self.prompt is None:
            raise InvalidParameterError("raw", "applies only to prompt")
        if self.system is not None and (not isinstance(self.system, str) or self.prompt is None):
            raise InvalidParameterError("system", "must be a string, and applies only to prompt")
        if not isinstance(self.stream, bool):
            raise InvalidParameterError("stream", "must be a boolean")
        if self.tools is not None and (not isinstance(self.tools, list) or self.messages is None):
            raise InvalidParameterError("tools", "must be a list of tools, and applies only to messages")
        if not isinstance(self.params, SamplingParams):
            raise InvalidParameterError("params", "must be a SamplingParams")
        self.params.validate()


@message(54)
class Cancel:
    request_id: str


@message(55)
class Accepted:
    """The prompt is tokenized and submitted; the terminal frame is still to come."""

    request_id: str
    prompt_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)


@message(56)
class HealthRequest:
    query_id: int = 0


@message(57)
class Health:
    query_id: int
    status: str  # "ok" | "degraded" (a step is overdue) | "dead"
    model: str
    error: str = ""  # why the engine is dead, when it is
    uptime_s: float = 0.0
    clients: int = 0  # connections with requests in flight
    inflight: int = 0  # requests in flight over this ZeroMQ front end
    stats: Stats | None = None  # the scheduler's counters (None when it could not answer)


@message(58)
class KeepAlive:
    """Server -> client probe that finds vanished clients while their requests are silent; ignore it."""

    time: float = 0.0
