"""``tools`` and ``tool_choice`` of a request (both HTTP APIs and ZeroMQ): validated, turned into
the prompt (the template's tools section or the generic preamble), the grammar that forces a
call, and the reply's calls. Bad input raises InvalidParameterError naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem.tools.family import Tool, template_family, template_kwargs, template_messages
from tandem.tools.grammar import forced_call_grammar
from tandem.tools.parse import ToolCall, ToolStream, parse_reply
from tandem.validation import InvalidParameterError

AUTO, NONE, REQUIRED = "auto", "none", "required"


def bad(param: str, reason: str) -> InvalidParameterError:
    return InvalidParameterError(param, reason)


@dataclass
class ToolRequest:
    tools: list[Tool]
    choice: str  # auto | none | required | the name of the one function to call
    family: str

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    @property
    def offered(self) -> list[Tool]:
        """The tools the prompt shows: none for "none", only the named one when one is forced."""
        if self.choice == NONE:
            return []
        if self.choice in (AUTO, REQUIRED):
            return self.tools
        return [t for t in self.tools if t.name == self.choice]

    def grammar(self) -> tuple[str, str] | None:
        if self.choice in (AUTO, NONE):
            return None
        return forced_call_grammar(self.offered, self.family)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.choice == NONE:
            return text, []
        return parse_reply(text, self.family, frozenset(t.name for t in self.offered))

    def stream(self) -> ToolStream | None:
        return (
            None if self.choice == NONE else ToolStream(self.family, frozenset(t.name for t in self.offered))
        )


def _tool(i: int, raw: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(raw, dict):
        raise bad(where, 'must be an object {"type": "function", "function": {...}}')
    if raw.get("type", "function") != "function":
        raise bad(f"{where}.type", f"only function tools are supported, got {raw.get('type')!r}")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise bad(f"{where}.function", "must be an object with a 'name'")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.function.name", "must be a non-empty string")
    desc = fn.get("description") or ""
    if not isinstance(desc, str):
        raise bad(f"{where}.function.description", "must be a string")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise bad(f"{where}.function.parameters", "must be a JSON schema object")
    return Tool(name, desc, params)


def read_tools(body: dict[str, Any], template: str | None) -> ToolRequest | None:
    """The request's tools, or None when it has none (``tool_choice`` alone is then ignored)."""
    raw = body.get("tools")
    if raw in (None, []):
        return None
    if not isinstance(raw, list):
        raise bad("tools", "must be a list of tools")
    tools = [_tool(i, t) for i, t in enumerate(raw)]
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise bad("tools", "two tools have the same name")
    choice = body.get("tool_choice", AUTO)
    if choice is None:
        choice = AUTO
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad("tool_choice", 'a named choice is {"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise bad("tool_choice", f"names {name!r}, which is not in tools ({', '.join(names)})")
        choice = name
    elif choice not in (AUTO, NONE, REQUIRED):
        raise bad("tool_choice", f'must be "auto", "none", "required" or a named function, got {choice!r}')
    return ToolRequest(tools, choice, template_family(template))


def prompt_messages(
    messages: list[dict[str, Any]], tools: ToolRequest | None, template: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, template kwargs) for the chat template. Tool calls and results already in the
    chat are rendered in the family's form even when this request offers no tools."""
    family = tools.family if tools is not None else template_family(template)
    offered = tools.offered if tools is not None else []
    if tools is None and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages, {}
    return template_messages(messages, offered, family), template_kwargs(offered, family)
