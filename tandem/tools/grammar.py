"""The grammar that makes a reply one tool call (tool_choice "required" or a named function),
written in the family's own syntax so the reply parses like a call the model chose to make."""

from __future__ import annotations

import json
from typing import Any

from tandem.tools.family import HERMES, LLAMA3, Tool


def _call_schema(tool: Tool, args_key: str) -> dict[str, Any]:
    params = tool.parameters or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, args_key: params},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _one_of(tools: list[Tool], args_key: str) -> dict[str, Any]:
    schemas = [_call_schema(t, args_key) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def forced_call_grammar(tools: list[Tool], family: str) -> tuple[str, str]:
    """(SamplingParams.grammar_kind, grammar) for a reply that is exactly one call of ``tools``."""
    if family == HERMES:
        # Compact JSON, as in every tandem JSON grammar: a model may not pad it with whitespace forever.
        schema = json.dumps(_one_of(tools, "arguments") | {"x-guidance": {"whitespace_flexible": False}})
        return "lark", f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {schema}\n'
    if family == LLAMA3:
        return "json_schema", json.dumps(_one_of(tools, "parameters"))
    generic = {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": _one_of(tools, "arguments"),
                "minItems": 1,
                "maxItems": 1,
            }
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    return "json_schema", json.dumps(generic)
