"""Chat messages and the request features tandem does not have yet, refused clearly (400)."""

from __future__ import annotations

from typing import Any

from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.params import bad
from tandem.store.modelfile import ModelDefaults

_ROLES = ("system", "user", "assistant", "tool")


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"'{param}' is not supported: {what}", param=param, code="unsupported_parameter")


def refuse_ollama_features(body: dict[str, Any], model: str) -> None:
    if body.get("images"):
        raise unsupported("images", f"model '{model}' does not take images")
    think = body.get("think")
    if think not in (None, False):
        raise unsupported("think", f"model '{model}' does not support thinking")
    for name in ("template", "suffix"):
        if body.get(name):
            raise unsupported(name, "custom templates and fill-in-the-middle are not implemented")


def refuse_openai_features(body: dict[str, Any], chat: bool) -> None:
    if body.get("functions"):
        raise unsupported("functions", "the legacy functions API: use tools")
    if not chat and body.get("tools"):
        raise unsupported("tools", "tools need /v1/chat/completions")
    if not chat:
        if body.get("suffix"):
            raise unsupported("suffix", "fill-in-the-middle is not implemented")


def _text_content(content: Any, i: int) -> str:
    """OpenAI content may be a list of parts; only text parts are understood."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise unsupported(f"messages[{i}].content", f"content parts of type {kind!r}")
            if not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "a text part needs a string 'text'")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content", "must be a string or a list of content parts")


def chat_messages(raw: Any, openai: bool) -> list[dict[str, Any]]:
    """Validated messages in the shape chat templates expect."""
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise bad("messages", "must be a list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role = m.get("role")
        if openai and role == "developer":
            role = "system"  # OpenAI's newer name for the system message
        if role not in _ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}, got {role!r}")
        if m.get("images"):
            raise unsupported(f"messages[{i}].images", "this model does not take images")
        msg = {k: v for k, v in m.items() if k not in ("images", "thinking") and v is not None}
        msg["role"] = role
        msg["content"] = _text_content(m.get("content"), i)
        out.append(msg)
    return out


def with_defaults(
    messages: list[dict[str, Any]], defaults: ModelDefaults | None, system: str | None = None
) -> list[dict[str, Any]]:
    """A chat with a derived model's opening MESSAGEs before it and its SYSTEM prompt (or the
    request's ``system``) first, unless the chat brings its own system message."""
    if defaults is not None:
        messages = [dict(m) for m in defaults.messages] + messages
        system = system or defaults.system
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return messages
