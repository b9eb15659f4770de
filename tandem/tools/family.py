"""Which tool-call syntax a model's chat template speaks, and the prompt that offers the tools.

Families (by what the template itself writes):

- ``hermes``: Qwen2.5, Hermes and others: calls are ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``, results come back as ``tool`` messages;
- ``llama3``: Llama 3.1-3.3: a call is the whole reply, ``{"name": ..., "parameters": {...}}``
  (after an optional ``<|python_tag|>``), results as ``ipython``/``tool`` messages;
- ``generic``: a template with no tools section (SmolLM2): tandem adds GENERIC_PREAMBLE to the
  system message and the model answers ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``
  as its whole reply; earlier calls and tool results are written into the chat as text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

HERMES = "hermes"
LLAMA3 = "llama3"
GENERIC = "generic"

GENERIC_PREAMBLE = (
    "You can call these tools (functions), given as JSON schemas:\n"
    "{tools}\n"
    "To call tools, reply with this JSON object and nothing else:\n"
    '{{"tool_calls": [{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}]}}\n'
    "Otherwise, answer the user normally."
)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def template_family(template: str | None) -> str:
    if not template or "tools" not in template:
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template or "<|eom_id|>" in template:
        return LLAMA3
    return GENERIC


def _name(call: dict[str, Any]) -> str:
    return call.get("function", call).get("name", "")


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            args = {"_raw": args}
    return args if isinstance(args, dict) else {"value": args}


def template_messages(messages: list[dict[str, Any]], tools: list[Tool], family: str) -> list[dict[str, Any]]:
    """``messages`` as the family's template reads them. Tool-capable templates get assistant
    ``tool_calls`` with arguments as objects (what their ``tojson`` expects); the generic form
    gets calls and results as text, and the tools preamble in the system message."""
    out: list[dict[str, Any]] = []
    called: dict[str, str] = {}  # tool_call_id -> the function it called, to label its result
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        for c in calls or ():
            if isinstance(c, dict) and c.get("id"):
                called[c["id"]] = _name(c)
        if family != GENERIC:
            if calls:
                m["tool_calls"] = [
                    {
                        "type": "function",
                        "id": c.get("id", ""),
                        "function": {
                            "name": c.get("function", c).get("name", ""),
                            "arguments": _arguments(c),
                        },
                    }
                    for c in calls
                ]
            out.append(m)
            continue
        if calls:
            text = json.dumps(
                {
                    "tool_calls": [
                        {"name": c.get("function", c).get("name", ""), "arguments": _arguments(c)}
                        for c in calls
                    ]
                }
            )
            m = {"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()}
        elif m.get("role") == "tool":
            name = m.get("name") or m.get("tool_name") or called.get(m.get("tool_call_id") or "", "")
            label = f"Result of tool {name}" if name else "Tool result"
            m = {"role": "user", "content": f"{label}:\n{m.get('content') or ''}"}
        out.append(m)
    if family == GENERIC and tools:
        preamble = GENERIC_PREAMBLE.format(tools="\n".join(json.dumps(t.as_openai()) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{preamble}".strip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def template_kwargs(tools: list[Tool], family: str) -> dict[str, Any]:
    """What the chat template is rendered with (tool-capable templates read ``tools``)."""
    return {"tools": [t.as_openai() for t in tools]} if tools and family != GENERIC else {}
