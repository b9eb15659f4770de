"""Tools over HTTP: the request's tools (400 naming the field), and calls as each API writes them."""

from __future__ import annotations

import json
from typing import Any

from tandem.gateway.http.params import bad
from tandem.tools.parse import ToolCall
from tandem.tools.request import ToolRequest, read_tools
from tandem.validation import InvalidParameterError


def http_tools(body: dict[str, Any], template: str | None) -> ToolRequest | None:
    try:
        return read_tools(body, template)
    except InvalidParameterError as e:
        raise bad(e.param, str(e).split(": ", 1)[-1]) from None


def openai_tool_calls(calls: list[ToolCall], streamed: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        entry: dict[str, Any] = {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        out.append({"index": i, **entry} if streamed else entry)
    return out


def ollama_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"index": i, "name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]
