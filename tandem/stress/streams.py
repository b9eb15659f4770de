"""One streamed request over each API, read to its end, counting terminal frames: what the load
and soak scenarios send. Each returns a `StreamOutcome`; none raises for a server's answer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tandem.client import AsyncTandemClient, TandemError


@dataclass
class StreamOutcome:
    route: str
    status: int = 0  # HTTP status; 200 for a ZeroMQ request that was accepted
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    terminals: int = 0  # frames/lines/chunks that end the request: exactly one is right
    after_terminal: int = 0  # anything the server sent after its terminal frame
    finish_reason: str | None = None
    error: str | None = None  # the server's error code or message
    transport_error: str | None = None  # a reset, a broken stream: never right
    retry_after: float | None = None
    ttft_s: float | None = None
    total_s: float = 0.0
    request_id: str = ""  # ZeroMQ: the client's request id, to find the request in a server log
    accepted: bool | None = None  # ZeroMQ: whether its Accepted frame came (None over HTTP)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def zmq_stream(client: AsyncTandemClient, prompt: str, **sampling: Any) -> StreamOutcome:
    out = StreamOutcome("zmq")
    t0 = time.perf_counter()
    s = client.stream(prompt, raw=True, **sampling)
    out.request_id = s.request_id
    try:
        async with s:
            async for delta in s:
                if out.ttft_s is None and delta.token_ids:
                    out.ttft_s = time.perf_counter() - t0
                out.token_ids += delta.token_ids
                out.text += delta.text
            out.status = 200
            if s.finished is not None:
                out.terminals = 1
                out.finish_reason = s.finished.finish_reason
    except TandemError as e:
        out.terminals = 1
        out.error = e.code
        out.retry_after = e.retry_after_s
        if e.code in ("disconnected", "timeout"):
            # how far it got tells a request lost on its way in from one lost inside the server
            accepted = "accepted" if s.state.accepted is not None else "never accepted"
            out.transport_error = f"{e} ({accepted}, {len(out.token_ids)} tokens before)"
    out.accepted = s.state.accepted is not None
    out.total_s = time.perf_counter() - t0
    return out


async def _refused(out: StreamOutcome, r: httpx.Response) -> None:
    """A non-200 answer: its error and Retry-After, counted as the request's one terminal."""
    await r.aread()
    out.error = _error_text(r)
    out.retry_after = _retry_after(r)
    out.terminals = 1


async def ollama_stream(
    http: httpx.AsyncClient, model: str, prompt: str, options: dict[str, Any], **body: Any
) -> StreamOutcome:
    out = StreamOutcome("/api/generate")
    t0 = time.perf_counter()
    payload = {"model": model, "prompt": prompt, "raw": True, "stream": True, "options": options, **body}
    try:
        async with http.stream("POST", "/api/generate", json=payload) as r:
            out.status = r.status_code
            if r.status_code != 200:
                await _refused(out, r)
            else:
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    if out.terminals:
                        out.after_terminal += 1
                        continue
                    obj = json.loads(line)
                    if obj.get("response") and out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0
                    out.text += obj.get("response", "")
                    if obj.get("done") or "error" in obj:
                        out.terminals += 1
                        out.finish_reason = obj.get("done_reason")
                        out.error = obj.get("error")
    except httpx.HTTPError as e:
        out.transport_error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    return out


async def chat_stream(http: httpx.AsyncClient, model: str, prompt: str, **body: Any) -> StreamOutcome:
    out = StreamOutcome("/v1/chat/completions")
    t0 = time.perf_counter()
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True, **body}
    done_marks = 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=payload) as r:
            out.status = r.status_code
            if r.status_code != 200:
                await _refused(out, r)
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if done_marks:
                        out.after_terminal += 1
                        continue
                    if data == "[DONE]":
                        done_marks += 1
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        out.terminals += 1
                        out.error = str(obj["error"])
                        continue
                    for choice in obj.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece and out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - t0
                        out.text += piece
                        if choice.get("finish_reason"):
                            out.terminals += 1
                            out.finish_reason = choice["finish_reason"]
        if out.status == 200 and done_marks != 1:
            out.transport_error = f"the stream ended with {done_marks} [DONE] marks"
    except httpx.HTTPError as e:
        out.transport_error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    return out


def _error_text(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
    except ValueError:
        return r.text[:200]
    return str(err.get("message") if isinstance(err, dict) else err)


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
