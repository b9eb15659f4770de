"""Every message that crosses a process boundary, as typed msgspec Structs with one msgpack codec.

Wire form: ``[tag, field0, field1, ...]`` in declaration order; a message nested in another is the
array of its fields, without a tag. New fields are only ever appended with defaults, so a peer one
version behind decodes what it knows and ignores the rest (PROTOCOL.md, "Versioning"). Tensors
travel as raw bytes plus dtype/shape or in the shared-memory ring, never as lists of floats.

The fields are encoded and decoded (and their types checked) by msgspec, each message as an
array-like Struct. msgspec's own tagging would put the tag into nested messages too, which the
wire does not have, so the tag is spliced in front of the fields here, in the frame's array header.
"""

from __future__ import annotations

import contextlib
import enum
import re
import types
import typing
from typing import Any, ClassVar, TypeVar

import msgspec
from msgspec import field

PROTOCOL_VERSION = 1
# Revisions add fields and capabilities within a major version (PROTOCOL.md, "Versioning"): 1.1
# structured output and tools, 1.2 prompt logprobs, 1.3 embeddings.
PROTOCOL_REVISION = "1.3"

_REGISTRY: dict[int, type[Message]] = {}
_DECODERS: dict[int, msgspec.msgpack.Decoder] = {}
_FRAMING: dict[type, tuple[bytes, int]] = {}  # class -> (array header and tag, its fields' header length)
_ENCODER = msgspec.msgpack.Encoder()
_PROBE = msgspec.msgpack.Decoder()  # untyped: only to say why a frame is not a message
_INT_SIZES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}  # msgpack int markers
_FIXARRAY = [bytes((0x90 | n,)) for n in range(15)]  # the fields' header, by count
_INDEX = re.compile(r"\[(\d+)\]")  # one step of msgspec's path to the value at fault
M = TypeVar("M", bound="Message")


class MessageError(ValueError):
    """A frame that does not decode into a known message. When a field's value is of the wrong type
    or shape, ``field`` names it (the innermost, for a field of a nested message) and ``reason`` says
    what is wrong with it. ``message_type`` is the message the frame's tag names, and ``request_id``
    the frame's request id when it has a readable one, so that the request can still be answered."""

    def __init__(
        self,
        text: str,
        field: str | None = None,
        reason: str = "",
        message_type: type | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(text)
        self.field = field
        self.reason = reason
        self.message_type = message_type
        self.request_id = request_id


class Message(msgspec.Struct, array_like=True):
    """A message: its fields in wire order, its tag in ``TAG`` (set by ``@message``)."""

    TAG: ClassVar[int]


def message(tag: int):
    def wrap(cls: type[M]) -> type[M]:
        if tag in _REGISTRY:
            raise RuntimeError(f"message tag {tag} used twice ({_REGISTRY[tag].__name__}, {cls.__name__})")
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return wrap


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _framing(cls: type) -> tuple[bytes, int]:
    tag = getattr(cls, "TAG", None)
    if not isinstance(tag, int) or _REGISTRY.get(tag) is not cls:
        raise TypeError(f"{cls.__name__} is not a message")
    n = len(cls.__struct_fields__)  # type: ignore[attr-defined]
    framing = (_array_header(n + 1) + _ENCODER.encode(tag), len(_array_header(n)))
    _FRAMING[cls] = framing
    return framing


def encode(msg: Message) -> bytes:
    try:
        prefix, skip = _FRAMING[type(msg)]
    except KeyError:
        prefix, skip = _framing(type(msg))
    return prefix + _ENCODER.encode(msg)[skip:]


def decode(data: bytes) -> Any:
    """The message in ``data``; MessageError when it is none. Fields past those this version knows
    are ignored, fields a shorter frame lacks take their defaults."""
    try:
        return _decode(data)
    except RecursionError:  # msgspec's own guard: values nested about a thousand deep
        raise MessageError("frame nests arrays or maps too deeply") from None


def _decode(data: bytes) -> Any:
    b0 = data[0] if len(data) > 3 else -1
    # Nearly every frame: a tag under 128, and under 16 fields or exactly 16 (then 15 after the tag).
    if 0x91 <= b0 <= 0x9F and data[1] < 0x80:
        tag, fields = data[1], _FIXARRAY[b0 - 0x91] + data[2:]
    elif b0 == 0xDC and data[1] == 0 and data[2] == 16 and data[3] < 0x80:
        tag, fields = data[3], b"\x9f" + data[4:]
    else:
        tag, n, start = _frame_head(data)
        fields = _array_header(n - 1) + data[start:]
    try:
        dec = _DECODERS[tag]
    except KeyError:
        dec = _decoder(tag)
    try:
        return dec.decode(fields)
    except msgspec.ValidationError as exc:
        raise _malformed(_REGISTRY[tag], str(exc), fields) from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"frame is not valid msgpack: {exc}") from None


def _decoder(tag: int) -> msgspec.msgpack.Decoder:
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise MessageError(f"unknown message tag {tag}")
    dec = _DECODERS[tag] = msgspec.msgpack.Decoder(cls)
    return dec


def _frame_head(data: bytes) -> tuple[int, int, int]:
    """(tag, array length, offset of the first field) of the frame ``data``."""
    b = data[0] if len(data) else -1
    if 0x90 <= b <= 0x9F:
        n, pos = b & 0x0F, 1
    elif b in (0xDC, 0xDD):
        pos = 3 if b == 0xDC else 5
        n = int.from_bytes(data[1:pos], "big")
    else:
        raise _not_a_message(data)
    t = data[pos] if n and pos < len(data) else -1
    if 0 <= t < 0x80:
        return t, n, pos + 1
    if t >= 0xE0:  # negative fixint
        return t - 0x100, n, pos + 1
    size = _INT_SIZES.get(t)
    if size is None or pos + 1 + size > len(data):
        raise _not_a_message(data)
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "big", signed=t >= 0xD0), n, pos + 1 + size


def _not_a_message(data: bytes) -> MessageError:
    try:
        _PROBE.decode(data)
    except msgspec.DecodeError as exc:
        return MessageError(f"frame is not valid msgpack: {exc}")
    return MessageError("frame is not a tandem message (expected [tag, ...fields])")


def _malformed(cls: type[Message], why: str, fields: bytes) -> MessageError:
    """msgspec's reason, with its path into the fields (``$[6][13]``) told by field names
    (``params.return_logits``), and the request id if the fields have a readable one."""
    rid = None
    if cls.__struct_fields__[:1] == ("request_id",):
        with contextlib.suppress(msgspec.DecodeError):  # a string that is not UTF-8
            values = _PROBE.decode(fields)
            rid = values[0] if values and type(values[0]) is str else None
    reason, _, path = why.partition(" - at `$")
    if not path.endswith("`"):
        return MessageError(f"malformed {cls.__name__}: {why}", message_type=cls, request_id=rid)
    name, where = _named_path(cls, path[:-1])
    return MessageError(f"malformed {cls.__name__}: {reason} at `{where}`", name, reason, cls, rid)


def _named_path(cls: type[Message], path: str) -> tuple[str | None, str]:
    """(the innermost field named, ``path`` with field names for the indexes into messages)."""
    name, out, pos, hint = None, "", 0, cls
    while (at := _INDEX.match(path, pos)) is not None:
        i, pos = int(at.group(1)), at.end()
        if isinstance(hint, type) and issubclass(hint, Message) and i < len(hint.__struct_fields__):
            name = hint.__struct_fields__[i]
            out += f".{name}" if out else name
            hint = _unwrap(msgspec.structs.fields(hint)[i].type)
        else:
            out += f"[{i}]"
            args = typing.get_args(hint)
            hint = _unwrap(args[0]) if typing.get_origin(hint) is list and args else None
    return name, out + path[pos:]


def _unwrap(hint: Any) -> Any:
    """``hint`` without None (``T | None`` -> ``T``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint


# --------------------------------------------------------------------------------------
# Actor control (any actor -> its parent, parent -> actor)
# --------------------------------------------------------------------------------------
@message(1)
class Ready(Message):
    name: str
    pid: int
    version: int = PROTOCOL_VERSION
    info: dict[str, Any] = field(default_factory=dict)


@message(2)
class Heartbeat(Message):
    name: str
    pid: int
    time: float


@message(3)
class ActorFailed(Message):
    name: str
    pid: int
    error: str
    traceback: str = ""


@message(4)
class Stop(Message):
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


@message(10)
class SamplingParams(Message):
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
    # Echo: the logprob of every prompt token given the ones before it (positions 1..n-1), plus
    # the top-n there; None: none. Such a request never takes its prompt from the prefix cache.
    prompt_logprobs: int | None = None


@message(11)
class SubmitRequest(Message):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0


@message(12)
class CancelRequest(Message):
    request_id: str
    reason: str = "cancelled"


@message(13)
class TokenDelta(Message):
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    # per token: [[id, logprob], ...] best first
    top_logprobs: list[list[list[int | float]]] | None = None
    logits: list[bytes] | None = None  # per token: float32 row of the vocabulary
    # Echo (params.prompt_logprobs): logprobs of the next prompt tokens this step's prefill chunk
    # computed, in prompt order (the first delta's first entry is prompt token 1's), top-n as above.
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[list[int | float]]] | None = None


def merge_delta(into: Any, d: TokenDelta) -> None:
    """Append delta ``d`` to ``into`` (a TokenDelta, or a reply with the same five fields): the
    one merge of deltas that every non-streaming reply is built with. A reply without the
    prompt-logprob fields leaves them out."""
    into.token_ids += d.token_ids
    into.text += d.text
    for name in ("logprobs", "top_logprobs", "logits", "prompt_logprobs", "prompt_top_logprobs"):
        extra = getattr(d, name)
        if extra is not None and hasattr(into, name):
            setattr(into, name, (getattr(into, name) or []) + extra)


@message(14)
class Finished(Message):
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
class RequestError(Message):
    request_id: str
    code: str  # an ErrorCode
    message: str
    retry_after_s: float = 0.0  # busy: the scheduler's estimate of the wait until the queue has room


@message(21)
class EmbedRequest(Message):
    """Embed a prompt: a prefill-only sequence whose answer is one pooled vector (then Finished)."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float = 0.0


@message(22)
class Embedding(Message):
    """The pooled (and, where the model says so, L2-normalized) final hidden state of a prompt."""

    request_id: str
    vector: bytes  # float32[dims], little-endian
    dims: int


@message(16)
class OutputBatch(Message):
    """Everything one scheduler step produced: one frame instead of one per request."""

    deltas: list[TokenDelta] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)
    errors: list[RequestError] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)  # each before its request's Finished


@message(17)
class StatsRequest(Message):
    query_id: int = 0


@message(18)
class Stats(Message):
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
class TraceRequest(Message):
    """Ask the scheduler for its recorded step timings (serve --trace-steps) from ``since_step`` on."""

    query_id: int = 0
    since_step: int = 0


@message(20)
class StepTrace(Message):
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
class Doorbell(Message):
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
    any_prompt_logprobs: bool = False  # some row wants its prompt positions' logprobs (target_ids)


@message(31)
class StepResult(Message):
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
    embeddings: bytes = b""  # float32[pooled rows, embed_dim]: the step's embed rows, in row order
    embed_dim: int = 0
    grammar_ms: float = 0.0  # host time spent on grammar matchers (advance + mask) in this step
    grammar_rows: int = 0  # constrained rows masked in this step
    # Prompt logprobs (rows with prompt_logprobs >= 0): one entry per prompt position p < prompt_len - 1
    # fed in this step, in row then position order: the logprob of prompt token p + 1, and top-k.
    num_prompt_lps: int = 0
    prompt_lps: bytes = b""  # float32[num_prompt_lps]
    prompt_top_k: int = 0
    prompt_top_ids: bytes = b""  # int64[num_prompt_lps, prompt_top_k]
    prompt_top_lps: bytes = b""  # float32[num_prompt_lps, prompt_top_k]


@message(32)
class GrammarSpec(Message):
    """Scheduler -> worker, on the doorbell channel before the first step that uses it: the
    grammar that ring rows with ``grammar_id`` follow (kinds as SamplingParams.grammar_kind)."""

    grammar_id: int
    kind: str
    text: str


@message(33)
class GrammarRelease(Message):
    """Scheduler -> worker: no sequence uses ``grammar_id`` any more (sent after its last step)."""

    grammar_id: int


# --------------------------------------------------------------------------------------
# ZeroMQ client protocol (client DEALER <-> gateway ROUTER); see PROTOCOL.md. Tags 50-69.
# --------------------------------------------------------------------------------------


@message(50)
class ClientHello(Message):
    version: int  # the client's PROTOCOL_VERSION (major: a mismatch is refused)
    client_name: str = ""


@message(51)
class ServerHello(Message):
    version: int
    model: str
    context_length: int
    capabilities: list[str] = field(default_factory=list)
    vocab_size: int = 0
    max_inflight: int = 0  # per connection
    max_msg_size: int = 0  # bytes; a larger frame drops the connection
    server_version: str = ""
    revision: str = ""  # PROTOCOL_REVISION (1.1 on); an older server sends none


@message(52)
class ChatMessage(Message):
    role: str
    content: str
    # 1.1: an assistant turn's calls ([{id, type, function: {name, arguments}}]) and a tool
    # result's call id
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


@message(53)
class GenerateRequest(Message):
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


@message(54)
class Cancel(Message):
    request_id: str


@message(55)
class Accepted(Message):
    """The prompt is tokenized and submitted; the terminal frame is still to come."""

    request_id: str
    prompt_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)


@message(56)
class HealthRequest(Message):
    query_id: int = 0


@message(57)
class Health(Message):
    query_id: int
    status: str  # "ok" | "degraded" (a step is overdue) | "dead"
    model: str
    error: str = ""  # why the engine is dead, when it is
    uptime_s: float = 0.0
    clients: int = 0  # connections with requests in flight
    inflight: int = 0  # requests in flight over this ZeroMQ front end
    stats: Stats | None = None  # the scheduler's counters (None when it could not answer)


@message(58)
class KeepAlive(Message):
    """Server -> client probe that finds vanished clients while their requests are silent; ignore it."""

    time: float = 0.0


@message(59)
class EmbedInputRequest(Message):
    """Client -> server (1.3): embed one input. Answered with Accepted, then the Embedding (tag 22:
    the model's own vector, normalized where its pooling config says so, and always for generative
    models), then Finished; or a RequestError."""

    request_id: str
    prompt: str | None = None  # raw text (no chat template), framed as the model frames inputs
    prompt_token_ids: list[int] | None = None
    truncate: bool = True  # cut an input past the limit (BERT's final [SEP] kept); false: refuse it
