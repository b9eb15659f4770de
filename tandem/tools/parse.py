"""Find tool calls in a reply, in the syntax of the template family (see family.py).

Only the family's own call syntax counts, and only as the family writes it: ``<tool_call>``
blocks (hermes), or a JSON call that is the *whole* reply (llama3, generic), naming a tool the
request declared, with an object of arguments. JSON that merely appears inside prose, or a call
of an undeclared tool, stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tandem.tools.family import GENERIC, HERMES, LLAMA3

_HERMES_OPEN = "<tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return v if isinstance(v, dict) else None


def _call(obj: dict[str, Any] | None, names: frozenset[str], args_keys: tuple[str, ...]) -> ToolCall | None:
    if obj is None or obj.get("name") not in names:
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as a JSON string
                args = _json_object(args)
            return ToolCall(obj["name"], args) if isinstance(args, dict) else None
    return ToolCall(obj["name"], {}) if len(obj) == 1 else None


def parse_reply(text: str, family: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """(the reply's content without its calls, the calls)."""
    if family == HERMES:
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        for m in _HERMES_BLOCK.finditer(text):
            call = _call(_json_object(m.group(1)), names, ("arguments", "parameters"))
            if call is None:
                continue  # not a call of a declared tool: it stays text
            kept.append(text[pos : m.start()])
            pos = m.end()
            calls.append(call)
        kept.append(text[pos:])
        return ("".join(kept).strip() if calls else text), calls
    body = text.strip()
    if family == LLAMA3:
        body = body.removeprefix(_PYTHON_TAG).strip()
        call = _call(_json_object(body), names, ("parameters", "arguments"))
        return ("", [call]) if call is not None else (text, [])
    obj = _json_object(body)
    items = obj.get("tool_calls") if obj is not None and len(obj) == 1 else None
    if not isinstance(items, list) or not items:
        return text, []
    found = [_call(c if isinstance(c, dict) else None, names, ("arguments", "parameters")) for c in items]
    if any(c is None for c in found):
        return text, []
    return "", [c for c in found if c is not None]


def _partial_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolStream:
    """Streamed text in, content that is certainly not part of a call out; calls at the end.

    hermes: text streams until a ``<tool_call>`` starts (a possible start is held back), then
    the rest is held and parsed at the end. llama3 and generic: a call is the whole reply, so a
    reply that starts like JSON (``{``, or the python tag) is held to the end; any other start
    streams as it comes."""

    def __init__(self, family: str, names: frozenset[str]) -> None:
        self.family = family
        self.names = names
        self._held = ""
        self._holding = False  # past the point where a call may have begun
        self._decided = False  # whole-reply families: known not to be a call

    def feed(self, text: str) -> str:
        if self._holding:
            self._held += text
            return ""
        buf = self._held + text
        if self.family == HERMES:
            i = buf.find(_HERMES_OPEN)
            if i >= 0:
                self._holding, self._held = True, buf[i:]
                return buf[:i]
            keep = _partial_prefix(buf, _HERMES_OPEN)
            self._held = buf[len(buf) - keep :]
            return buf[: len(buf) - keep]
        if self._decided:
            self._held = ""
            return buf
        start = buf.lstrip()
        if not start:
            self._held = buf
            return ""
        if start.startswith("{") or start.startswith(_PYTHON_TAG) or _PYTHON_TAG.startswith(start):
            if start.startswith("{") or start.startswith(_PYTHON_TAG):
                self._holding = True
            self._held = buf
            return ""
        self._decided = True
        self._held = ""
        return buf

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, the calls)."""
        held, self._held = self._held, ""
        if not held:
            return "", []
        if self.family == HERMES:
            return parse_reply(held, HERMES, self.names)
        return parse_reply(held, self.family if self.family in (LLAMA3, GENERIC) else GENERIC, self.names)
