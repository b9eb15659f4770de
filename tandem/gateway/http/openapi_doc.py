"""The OpenAPI document served at /openapi.json: FastAPI's list of routes plus each body's shape.

The routes read their JSON bodies themselves (one parser for ollama's and OpenAI's loose inputs,
errors that name the field), so FastAPI cannot see what they take; the request bodies are written
out here instead, as JSON Schema. They describe what a well-formed request looks like, for tools
that generate clients or fuzz the API (tests/stress/test_http_fuzz.py runs schemathesis on them);
the routes still accept and refuse exactly what they did.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STRS = {"type": "array", "items": _STR}
_INTS = {"type": "array", "items": _INT}
_OBJ = {"type": "object"}
_STOP = {"oneOf": [_STR, _STRS]}
_KEEP_ALIVE = {"oneOf": [_STR, _NUM]}
_FORMAT = {"oneOf": [{"type": "string", "enum": ["", "json"]}, _OBJ]}

_OPTIONS = {
    "type": "object",
    "description": "Sampling and context options (ollama's names).",
    "properties": {
        "num_predict": _INT,
        "num_ctx": _INT,
        "temperature": _NUM,
        "top_k": _INT,
        "top_p": _NUM,
        "min_p": _NUM,
        "seed": _INT,
        "stop": _STRS,
        "repeat_penalty": _NUM,
        "presence_penalty": _NUM,
        "frequency_penalty": _NUM,
        "ignore_eos": _BOOL,
    },
}
_TOOL = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {"name": _STR, "description": _STR, "parameters": _OBJ},
            "required": ["name"],
        },
    },
    "required": ["type", "function"],
}
_TOOLS = {"type": "array", "items": _TOOL}
_OLLAMA_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
        "content": _STR,
        "images": _STRS,
        "tool_calls": {"type": "array", "items": _OBJ},
        "name": _STR,
    },
    "required": ["role", "content"],
}
_OPENAI_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "oneOf": [
                _STR,
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": _STR},
                        "required": ["type", "text"],
                    },
                },
            ]
        },
        "name": _STR,
        "tool_calls": {"type": "array", "items": _OBJ},
        "tool_call_id": _STR,
    },
    "required": ["role", "content"],
}
_OPENAI_SAMPLING = {
    "max_tokens": _INT,
    "max_completion_tokens": _INT,
    "temperature": _NUM,
    "top_p": _NUM,
    "top_k": _INT,
    "min_p": _NUM,
    "n": _INT,
    "seed": _INT,
    "stop": _STOP,
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "repetition_penalty": _NUM,
    "logit_bias": _OBJ,
    "ignore_eos": _BOOL,
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
}


def _body(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {"required": True, "content": {"application/json": {"schema": schema}}}


# (path, method) -> the requestBody object of that operation
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/generate", "post"): _body(
        {
            "model": _STR,
            "prompt": _STR,
            "suffix": _STR,
            "system": _STR,
            "template": _STR,
            "context": _INTS,
            "raw": _BOOL,
            "stream": _BOOL,
            "format": _FORMAT,
            "images": _STRS,
            "think": _BOOL,
            "options": _OPTIONS,
            "keep_alive": _KEEP_ALIVE,
        },
        ("model",),
    ),
    ("/api/chat", "post"): _body(
        {
            "model": _STR,
            "messages": {"type": "array", "items": _OLLAMA_MESSAGE},
            "tools": _TOOLS,
            "format": _FORMAT,
            "stream": _BOOL,
            "think": _BOOL,
            "options": _OPTIONS,
            "keep_alive": _KEEP_ALIVE,
        },
        ("model",),
    ),
    ("/api/show", "post"): _body({"model": _STR, "name": _STR, "verbose": _BOOL}),
    ("/api/pull", "post"): _body({"model": _STR, "name": _STR, "insecure": _BOOL, "stream": _BOOL}),
    ("/api/delete", "delete"): _body({"model": _STR, "name": _STR}),
    ("/api/copy", "post"): _body({"source": _STR, "destination": _STR}, ("source", "destination")),
    ("/api/create", "post"): _body(
        {
            "model": _STR,
            "name": _STR,
            "from": _STR,
            "modelfile": _STR,
            "system": _STR,
            "template": _STR,
            "license": _STOP,
            "parameters": _OBJ,
            "messages": {"type": "array", "items": _OLLAMA_MESSAGE},
            "stream": _BOOL,
        }
    ),
    ("/api/embed", "post"): _body(
        {
            "model": _STR,
            "input": _STOP,
            "truncate": _BOOL,
            "dimensions": _INT,
            "options": _OPTIONS,
            "keep_alive": _KEEP_ALIVE,
        },
        ("model", "input"),
    ),
    ("/api/embeddings", "post"): _body(
        {"model": _STR, "prompt": _STR, "options": _OPTIONS, "keep_alive": _KEEP_ALIVE}, ("model",)
    ),
    ("/v1/chat/completions", "post"): _body(
        {
            "model": _STR,
            "messages": {"type": "array", "items": _OPENAI_MESSAGE},
            **_OPENAI_SAMPLING,
            "logprobs": _BOOL,
            "top_logprobs": _INT,
            "response_format": _OBJ,
            "tools": _TOOLS,
            "tool_choice": {"oneOf": [{"type": "string", "enum": ["auto", "none", "required"]}, _OBJ]},
        },
        ("model", "messages"),
    ),
    ("/v1/completions", "post"): _body(
        {
            "model": _STR,
            "prompt": {"oneOf": [_STR, _STRS, _INTS]},
            "suffix": _STR,
            "echo": _BOOL,
            "logprobs": _INT,
            **_OPENAI_SAMPLING,
        },
        ("model", "prompt"),
    ),
    ("/v1/embeddings", "post"): _body(
        {
            "model": _STR,
            "input": {"oneOf": [_STR, _STRS, _INTS]},
            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            "dimensions": _INT,
        },
        ("model", "input"),
    ),
    ("/v1/responses", "post"): _body(
        {
            "model": _STR,
            "input": {"oneOf": [_STR, {"type": "array", "items": _OBJ}]},
            "instructions": _STR,
            "max_output_tokens": _INT,
            "temperature": _NUM,
            "top_p": _NUM,
            "seed": _INT,
            "stream": _BOOL,
            "store": _BOOL,
            "previous_response_id": _STR,
            "metadata": _OBJ,
            "text": _OBJ,
            "tools": {"type": "array", "items": _OBJ},
        },
        ("model", "input"),
    ),
    ("/tokenize", "post"): _body(
        {
            "model": _STR,
            "prompt": _STR,
            "messages": {"type": "array", "items": _OPENAI_MESSAGE},
            "add_special_tokens": _BOOL,
        }
    ),
    ("/detokenize", "post"): _body({"model": _STR, "tokens": _INTS}, ("tokens",)),
}


def install_openapi(app: FastAPI) -> None:
    """Serve /openapi.json with the request bodies above filled in (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for (path, method), body in BODIES.items():
                op = doc.get("paths", {}).get(path, {}).get(method)
                if op is not None:
                    op["requestBody"] = body
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
