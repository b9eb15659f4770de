"""The race's HTTP client: B concurrent streamed `/v1/completions` requests against a server.

tandem serve and llama-server get the very same requests from the very same code: the prompt as
token ids (so both see exactly `prompt_len` tokens), greedy, `ignore_eos`, `max_tokens` new
tokens, `stream: true` with usage. Time to first token and the gaps between text chunks are
read off the stream as it arrives; the token count is the server's usage figure, checked
against what was asked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tandem.bench.samples import BenchError, RunSample

log = logging.getLogger(__name__)


@dataclass
class _Request:
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    done: float = 0.0
    completion_tokens: int | None = None
    finish_reason: str | None = None


def completion_body(prompt: list[int], gen_len: int, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": gen_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return body


def _read_event(line: str, req: _Request, now: float) -> bool:
    """Fold one SSE line into the request; True at the end of the stream."""
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    event = json.loads(data)
    if "error" in event:
        raise BenchError(f"the server failed the request mid-stream: {str(event['error'])[:300]}")
    for choice in event.get("choices") or []:
        if choice.get("text"):
            req.chunks.append(now)
        if choice.get("finish_reason"):
            req.finish_reason = choice["finish_reason"]
    usage = event.get("usage")
    if usage:
        req.completion_tokens = int(usage["completion_tokens"])
    return False


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> _Request:
    req = _Request(sent=time.perf_counter())
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise BenchError(f"POST {url}: HTTP {r.status_code}: {text[:300]}")
        async for line in r.aiter_lines():
            if _read_event(line, req, time.perf_counter()):
                break
    req.done = time.perf_counter()
    return req


def _check(req: _Request, gen_len: int, url: str) -> int:
    tokens = req.completion_tokens
    if tokens is None:
        raise BenchError(f"{url} sent no usage figures (stream_options.include_usage)")
    if tokens != gen_len:
        raise BenchError(
            f"{url} generated {tokens} tokens of the {gen_len} asked (finish_reason "
            f"{req.finish_reason!r}): the server did not honour ignore_eos / max_tokens"
        )
    return tokens


async def _batch(url: str, bodies: list[dict[str, Any]], timeout_s: float) -> tuple[float, list[_Request]]:
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    # trust_env off: a proxy from the environment must not sit between the bench and a loopback server.
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        reqs = await asyncio.wait_for(
            asyncio.gather(*(_one(client, url, b) for b in bodies)), timeout=timeout_s
        )
    return t0, list(reqs)


def run_http_batch(
    base_url: str, prompts: list[list[int]], gen_len: int, model: str | None = None, timeout_s: float = 600.0
) -> RunSample:
    """Send every prompt at once and wait for every reply; raise BenchError on anything unexpected."""
    url = base_url.rstrip("/") + "/v1/completions"
    bodies = [completion_body(p, gen_len, model) for p in prompts]
    try:
        t0, reqs = asyncio.run(_batch(url, bodies, timeout_s))
    except (httpx.HTTPError, TimeoutError) as e:
        raise BenchError(f"POST {url}: {type(e).__name__}: {e}") from None
    tokens = sum(_check(r, gen_len, url) for r in reqs)
    return RunSample(
        batch_size=len(prompts),
        tokens=tokens,
        wall_s=max(r.done for r in reqs) - t0,
        ttft_ms=[(r.chunks[0] - r.sent) * 1000 for r in reqs if r.chunks],
        itl_ms=[(b - a) * 1000 for r in reqs for a, b in itertools.pairwise(r.chunks)],
    )
