"""Structured-output parameters of both APIs -> (grammar_kind, grammar) for SamplingParams.

ollama: ``format: "json"`` or ``format: {JSON schema}``. OpenAI: ``response_format`` of type
``text``, ``json_object`` or ``json_schema`` (``{"json_schema": {"name", "schema", "strict"}}``),
and vLLM's extensions ``guided_json``, ``guided_regex``, ``guided_grammar`` (Lark, or GBNF when
it has ``::=``) and ``guided_choice``, also as ``structured_outputs: {json, regex, grammar,
choice}``. At most one per request.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tandem.gateway.http.params import bad

Grammar = tuple[str, str]  # (SamplingParams.grammar_kind, SamplingParams.grammar)


def _schema(param: str, v: Any) -> Grammar:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise bad(param, f"is not valid JSON: {e}") from None
    if not isinstance(v, dict | bool):
        raise bad(param, "must be a JSON schema (an object)")
    return "json_schema", json.dumps(v)


def ollama_format(body: dict[str, Any]) -> Grammar | None:
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return "json", ""
    if isinstance(fmt, dict):
        return _schema("format", fmt)
    raise bad("format", 'must be "json" or a JSON schema object')


def _grammar_text(param: str, v: Any) -> Grammar:
    if not isinstance(v, str) or not v.strip():
        raise bad(param, "must be a non-empty grammar string (Lark, or GBNF)")
    return ("gbnf" if "::=" in v else "lark"), v


def _choice(param: str, v: Any) -> Grammar:
    if not isinstance(v, list) or not v or not all(isinstance(c, str) for c in v):
        raise bad(param, "must be a non-empty list of strings")
    return "regex", "|".join(re.escape(c) for c in v)


def _regex(param: str, v: Any) -> Grammar:
    if not isinstance(v, str) or not v:
        raise bad(param, "must be a non-empty regular expression")
    return "regex", v


def _response_format(rf: Any) -> Grammar | None:
    if not isinstance(rf, dict):
        raise bad("response_format", "must be an object with a 'type'")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return "json", ""
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad("response_format.json_schema", "must be an object with 'name' and 'schema'")
        schema = js.get("schema", js.get("schema_"))
        if schema is None:
            return "json", ""  # OpenAI allows a name without a schema: any JSON object
        return _schema("response_format.json_schema.schema", schema)
    raise bad("response_format", f"type must be text, json_object or json_schema, got {kind!r}")


def openai_format(body: dict[str, Any]) -> Grammar | None:
    found: list[tuple[str, Grammar]] = []
    if (rf := body.get("response_format")) is not None and (g := _response_format(rf)) is not None:
        found.append(("response_format", g))
    readers = {"json": _schema, "regex": _regex, "grammar": _grammar_text, "choice": _choice}
    for name, read in readers.items():
        if (v := body.get(f"guided_{name}")) is not None:
            found.append((f"guided_{name}", read(f"guided_{name}", v)))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("structured_outputs", "must be an object")
        for name, read in readers.items():
            if (v := so.get(name)) is not None:
                found.append((f"structured_outputs.{name}", read(f"structured_outputs.{name}", v)))
    if len(found) > 1:
        raise bad(found[1][0], f"give one structured-output constraint, not {', '.join(n for n, _ in found)}")
    return found[0][1] if found else None
