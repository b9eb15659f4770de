"""Reading a client's payload frame, and saying why one cannot be read, under its request id if it has one.

`decode` refuses a whole frame for one bad field: a string that is not UTF-8 (checked while
unpacking), a value of the wrong type, or a nested message of the wrong shape. The protocol still
owes such a GenerateRequest (or EmbedInputRequest) exactly one terminal frame under its own id, so
a second, lenient pass unpacks the raw array (invalid UTF-8 kept as surrogate escapes), takes the
request id by position and names the field at fault: for a value of the wrong type, with the words
request validation uses for it. Nothing of the client's data is echoed back but the request id itself.
"""

from __future__ import annotations

from typing import Any

import msgpack

from tandem.messages import (
    ChatMessage,
    EmbedInputRequest,
    GenerateRequest,
    MessageError,
    SamplingParams,
    decode,
)
from tandem.validation import InvalidParameterError, validate_request

_FIELDS = GenerateRequest.__struct_fields__
# The requests a client waits on by id: a frame of theirs cut short is answered under that id.
_ID_FIRST = {GenerateRequest.TAG: _FIELDS, EmbedInputRequest.TAG: EmbedInputRequest.__struct_fields__}
_SAMPLING_FIELDS = SamplingParams.__struct_fields__
_CHAT_FIELDS = ChatMessage.__struct_fields__
# [role, content] at least: the fields after them have defaults
_CHAT_REQUIRED = len(_CHAT_FIELDS) - len(ChatMessage.__struct_defaults__)
_TOO_DEEP = "frame nests arrays or maps too deeply"


class UnreadableFrame(Exception):
    """A frame that is not a valid message; ``request_id`` is ``""`` when none could be read."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.message = message


def read_frame(payload: bytes) -> Any:
    """The message in ``payload``; raise UnreadableFrame when it is not one."""
    try:
        return decode(payload)
    except MessageError as e:
        raise _explain(payload, e) from None


def readable_id(value: Any) -> str | None:
    """``value`` if it can be sent back as a request id (a str that is valid UTF-8), else None."""
    return value if isinstance(value, str) and _utf8(value) else None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # C speed, even for megabytes
    except UnicodeEncodeError:  # a surrogate escape: the client sent bytes that are not UTF-8
        return False
    return True


def _explain(payload: bytes, err: MessageError) -> UnreadableFrame:
    why = str(err)
    try:
        arr = msgpack.unpackb(payload, raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    except Exception:  # not msgpack, or nested deeper than msgpack goes (it raises several types)
        return _explain_by_position(payload, why)
    tag = arr[0] if isinstance(arr, list) and arr and type(arr[0]) is int else None
    if tag == GenerateRequest.TAG and len(arr) > 1:
        return _explain_request(arr[1:], err)
    if tag == EmbedInputRequest.TAG and len(arr) > 1 and readable_id(arr[1]) is not None:
        # Its fields are flat: decode's error names the one at fault; the request id takes it.
        return UnreadableFrame(arr[1], _named(err))
    try:
        if tag is not None and _not_utf8(arr[1:], "") is not None:
            return UnreadableFrame("", f"a string in the frame (message tag {tag}) is not valid UTF-8")
    except RecursionError:
        return UnreadableFrame("", _TOO_DEEP)
    return UnreadableFrame("", _named(err))


def _explain_by_position(payload: bytes, why: str) -> UnreadableFrame:
    """A frame msgpack cannot unpack whole: a request's id read by position, one value at a
    time, and the field where unpacking fails (a truncated frame, or one nested too deeply)."""
    u = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    u.feed(payload)
    try:
        n = u.read_array_header()
        tag = u.unpack() if n > 1 else None
        fields = _ID_FIRST.get(tag) if type(tag) is int else None
        rid = readable_id(u.unpack()) if fields else None
    except Exception:  # not even the first values unpack
        return UnreadableFrame("", why)
    if rid is None or fields is None:
        return UnreadableFrame("", why)
    for name in fields[1 : n - 1]:
        try:
            u.unpack()
        except msgpack.StackError:
            return UnreadableFrame(rid, str(InvalidParameterError(name, "nests arrays or maps too deeply")))
        except Exception:
            return UnreadableFrame(rid, str(InvalidParameterError(name, "is not valid msgpack")))
    return UnreadableFrame("", why)  # every field reads: the frame is something else (trailing bytes)


def _named(err: MessageError) -> str:
    """The decode error, as the invalid parameter it is when one field is at fault."""
    return str(InvalidParameterError(err.field, err.reason)) if err.field else str(err)


def _explain_request(values: list[Any], err: MessageError) -> UnreadableFrame:
    """Why the GenerateRequest fields ``values`` do not decode, under the request id if it is readable."""
    rid = readable_id(values[0])
    if rid is None:
        reason = "not valid UTF-8" if isinstance(values[0], str) else "must be a string"
        return UnreadableFrame("", str(InvalidParameterError("request_id", reason)))
    for name, value in zip(_FIELDS, values, strict=False):
        try:
            where = _not_utf8_in_field(name, value)
        except RecursionError:
            return UnreadableFrame(rid, str(InvalidParameterError(name, "nests arrays or maps too deeply")))
        if where is not None:
            return UnreadableFrame(rid, str(InvalidParameterError(where[0], f"not valid UTF-8{where[1]}")))
    fields = dict(zip(_FIELDS, values, strict=False))
    return UnreadableFrame(rid, _bad_shape(fields) or _invalid(fields) or _named(err))


def _invalid(fields: dict[str, Any]) -> str | None:
    """What request validation says of ``fields`` taken as they are, types unchecked (the same words
    as for a well-typed request with a bad value); None if it finds nothing."""
    params = fields.get("params")
    if isinstance(params, list):
        fields["params"] = SamplingParams(*params[: len(_SAMPLING_FIELDS)])
    messages = fields.get("messages")
    if isinstance(messages, list):  # _bad_shape has checked each is a [role, content, ...] array
        fields["messages"] = [ChatMessage(*m[: len(_CHAT_FIELDS)]) for m in messages]
    try:
        validate_request(GenerateRequest(**fields))
    except InvalidParameterError as e:
        return str(e)
    return None


def _bad_shape(fields: dict[str, Any]) -> str | None:
    """The nested message that is not an array of its fields (what makes `decode` fail besides UTF-8)."""
    params = fields.get("params")
    if params is not None and not isinstance(params, list):
        return str(InvalidParameterError("params", "must be an array of sampling parameters"))
    messages = fields.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            return str(InvalidParameterError("messages", "must be an array of [role, content] messages"))
        for i, m in enumerate(messages):
            if not isinstance(m, list) or len(m) < _CHAT_REQUIRED:
                return str(InvalidParameterError("messages", f"message {i} is not a [role, content] array"))
    return None


def _not_utf8_in_field(name: str, value: Any) -> tuple[str, str] | None:
    """(parameter, where within it) of the first string in ``value`` that is not UTF-8."""
    if name == "params" and isinstance(value, list):
        for sub, v in zip(_SAMPLING_FIELDS, value, strict=False):
            where = _not_utf8(v, "")
            if where is not None:
                return sub, where
        return None
    if name == "messages" and isinstance(value, list):
        for i, m in enumerate(value):
            if isinstance(m, list):
                for sub, v in zip(_CHAT_FIELDS, m, strict=False):
                    where = _not_utf8(v, "")
                    if where is not None:
                        return name, f" (message {i}, {sub}{where})"
            elif (where := _not_utf8(m, "")) is not None:
                return name, f" (message {i}{where})"
        return None
    where = _not_utf8(value, "")
    return None if where is None else (name, where)


def _not_utf8(value: Any, path: str) -> str | None:
    """``path`` extended to the first string within ``value`` that is not UTF-8, None if none is."""
    if isinstance(value, str):
        return None if _utf8(value) else (f" at {path}" if path else "")
    if isinstance(value, list):
        for i, v in enumerate(value):
            where = _not_utf8(v, f"{path}[{i}]")
            if where is not None:
                return where
    elif isinstance(value, dict):
        for k, v in value.items():
            where = _not_utf8(k, f"{path}[a map key]") or _not_utf8(v, f"{path}[a map value]")
            if where is not None:
                return where
    return None
