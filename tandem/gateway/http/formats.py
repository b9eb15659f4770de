"""Small shared pieces of the two wire formats: timestamps, token text, logprobs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from tandem.messages import TokenDelta
from tandem.models.tokenizer import Tokenizer


def rfc3339(ts: datetime | None = None) -> str:
    """ollama's timestamps: RFC 3339 with a Z (ollama-python parses some of them as datetimes)."""
    return (ts or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")


def ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def token_bytes(tok: Tokenizer, token_id: int) -> bytes:
    try:
        return tok.token_bytes(token_id, skip_special=False)
    except (ValueError, IndexError):
        return b""


def token_text(tok: Tokenizer, token_id: int) -> str:
    return token_bytes(tok, token_id).decode("utf-8", errors="replace")


def delta_logprobs(tok: Tokenizer, d: TokenDelta) -> list[dict[str, Any]]:
    """Per token: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]} (OpenAI chat)."""
    if d.logprobs is None:
        return []
    out = []
    for i, (tid, lp) in enumerate(zip(d.token_ids, d.logprobs, strict=False)):
        raw = token_bytes(tok, tid)
        tops = d.top_logprobs[i] if d.top_logprobs and i < len(d.top_logprobs) else []
        top_list = []
        for t_id, t_lp in tops:
            t_raw = token_bytes(tok, int(t_id))
            top_list.append(
                {
                    "token": t_raw.decode("utf-8", errors="replace"),
                    "logprob": float(t_lp),
                    "bytes": list(t_raw),
                }
            )
        out.append(
            {
                "token": raw.decode("utf-8", errors="replace"),
                "logprob": float(lp),
                "bytes": list(raw),
                "top_logprobs": top_list,
            }
        )
    return out


def ollama_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ollama's shape: the OpenAI one without the bytes."""
    return [
        {
            "token": e["token"],
            "logprob": e["logprob"],
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]],
        }
        for e in entries
    ]
