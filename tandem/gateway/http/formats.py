"""Small shared pieces of the two wire formats: JSON text, timestamps, token text, logprobs."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from starlette import responses

from tandem.messages import TokenDelta
from tandem.tokenizer.tokenizer import Tokenizer

# Characters that json.dumps(ensure_ascii=False) leaves raw but that break clients: NEL, U+2028
# and U+2029 end a line for str.splitlines (httpx's iter_lines, hence ollama-python, splits NDJSON
# on them), and a lone surrogate cannot be encoded as UTF-8 at all. Outside strings, JSON text is
# ASCII, so each occurrence is inside a string, where the \uXXXX escape means the same character.
_UNSAFE_IN_JSON = re.compile(r"[\u0085\u2028\u2029\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def json_text(obj: Any, **kw: Any) -> str:
    """The one JSON serialiser of every body, stream line and event the server writes."""
    return _UNSAFE_IN_JSON.sub(_escape, json.dumps(obj, ensure_ascii=False, **kw))


class JSONResponse(responses.JSONResponse):
    """Starlette's JSONResponse, serialised by json_text."""

    def render(self, content: Any) -> bytes:
        return json_text(content, allow_nan=False, separators=(",", ":")).encode()


def rfc3339(ts: datetime | None = None) -> str:
    """ollama's timestamps: RFC 3339 with a Z (ollama-python parses some of them as datetimes)."""
    return (ts or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")


def ndjson(obj: dict[str, Any]) -> bytes:
    return (json_text(obj) + "\n").encode()


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json_text(obj)
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


def prompt_logprob_entries(
    tok: Tokenizer, prompt_ids: list[int], first: int, d: TokenDelta, head: bool
) -> list[dict[str, Any]]:
    """Entries as `delta_logprobs` gives them for the prompt tokens whose logprobs ``d`` carries,
    prompt token ``first`` + 1 on; ``head`` puts prompt token 0 before them, with no logprob
    (nothing comes before it) and no top_logprobs, as OpenAI's echo does."""
    n = len(d.prompt_logprobs or [])
    ids = prompt_ids[first + 1 : first + 1 + n]
    shown = TokenDelta("", ids, "", d.prompt_logprobs, d.prompt_top_logprobs)
    out = delta_logprobs(tok, shown)
    if head and prompt_ids:
        raw = token_bytes(tok, prompt_ids[0])
        head = {"token": raw.decode("utf-8", errors="replace"), "logprob": None, "bytes": list(raw)}
        out.insert(0, head | {"top_logprobs": None})
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
