"""Scenario 8: many concurrent streaming clients, over ZeroMQ and HTTP at once.

Every request must end with exactly one terminal frame (none lost, none duplicated, nothing after
it), and each greedy output must equal the same prompt's output when it ran alone: batching with
hundreds of others changes nothing. Figures: TTFT and total latency percentiles per protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import zmq.asyncio

from tandem.client import AsyncTandemClient
from tandem.stress.result import ScenarioResult
from tandem.stress.server import stress_server
from tandem.stress.streams import StreamOutcome, chat_stream, ollama_stream, percentile, zmq_stream

log = logging.getLogger(__name__)

PROMPTS = tuple(f"prompt {i}: the river runs" + " on" * i for i in range(8))
MAX_TOKENS = 16
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
OLLAMA_OPTIONS = {"temperature": 0, "num_predict": MAX_TOKENS, "ignore_eos": True}
OPENAI_BODY = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}


def run(scale: float = 1.0, clients: int = 256) -> ScenarioResult:
    """``clients`` streams over ZeroMQ and as many over HTTP (half /api/generate, half
    /v1/chat/completions), all at once; ``scale`` rounds of that."""
    return asyncio.run(_run(max(1, round(scale)), clients))


async def _run(rounds: int, clients: int) -> ScenarioResult:
    result = ScenarioResult("load")
    t0 = time.monotonic()
    with stress_server(args=("--max-queue", str(4 * clients))) as server:
        ctx = zmq.asyncio.Context()
        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        async with httpx.AsyncClient(
            base_url=server.http_url, timeout=300, limits=limits, trust_env=False
        ) as http:
            zmqs = [AsyncTandemClient(server.zmq_url, timeout=300, zmq_ctx=ctx) for _ in range(clients)]
            try:
                await asyncio.gather(*(c.connect() for c in zmqs))
                solo = await _solo_outputs(zmqs[0], http)
                outcomes: list[tuple[int, StreamOutcome]] = []
                for _ in range(rounds):
                    outcomes += await _one_round(zmqs, http, clients)
                await asyncio.sleep(0.5)  # frames a server sent past the end would arrive by now
                stray = sum(c.stray_frames for c in zmqs)
            finally:
                await asyncio.gather(*(c.close() for c in zmqs))
                ctx.term()
        _judge(result, outcomes, solo, stray)
        ps = server.ps()
        result.check(
            ps["kv_blocks_used"] == 0, f"KV blocks still used after the load: {ps['kv_blocks_used']}"
        )
    result.seconds = time.monotonic() - t0
    return result


async def _solo_outputs(zc: AsyncTandemClient, http: httpx.AsyncClient) -> dict[tuple[str, int], str]:
    """Each prompt alone on each route: what the concurrent runs must reproduce."""
    solo: dict[tuple[str, int], str] = {}
    for i, prompt in enumerate(PROMPTS):
        for o in (
            await zmq_stream(zc, prompt, **GREEDY),
            await ollama_stream(http, "tiny", prompt, OLLAMA_OPTIONS),
            await chat_stream(http, "tiny", prompt, **OPENAI_BODY),
        ):
            if o.error or o.transport_error:
                raise RuntimeError(
                    f"solo run of prompt {i} on {o.route} failed: {o.error or o.transport_error}"
                )
            solo[(o.route, i)] = o.text
    return solo


async def _one_round(
    zmqs: list[AsyncTandemClient], http: httpx.AsyncClient, clients: int
) -> list[tuple[int, StreamOutcome]]:
    async def tagged(i: int, coro: object) -> tuple[int, StreamOutcome]:
        return i, await coro  # type: ignore[misc]

    tasks = []
    for n in range(clients):
        i = n % len(PROMPTS)
        tasks.append(tagged(i, zmq_stream(zmqs[n], PROMPTS[i], **GREEDY)))
        if n % 2:
            tasks.append(tagged(i, chat_stream(http, "tiny", PROMPTS[i], **OPENAI_BODY)))
        else:
            tasks.append(tagged(i, ollama_stream(http, "tiny", PROMPTS[i], OLLAMA_OPTIONS)))
    return list(await asyncio.gather(*tasks))


def _judge(
    result: ScenarioResult,
    outcomes: list[tuple[int, StreamOutcome]],
    solo: dict[tuple[str, int], str],
    stray: int,
) -> None:
    lost = sum(1 for _, o in outcomes if o.terminals == 0)
    duplicated = sum(1 for _, o in outcomes if o.terminals > 1 or o.after_terminal) + stray
    failed = [o for _, o in outcomes if o.error or o.transport_error]
    differ = [(i, o.route) for i, o in outcomes if not o.error and o.text != solo[(o.route, i)]]
    result.add("requests", len(outcomes))
    result.add("lost terminal frames", lost)
    result.add("duplicated terminal frames", duplicated)
    result.add("failed requests", len(failed))
    result.add("outputs differing from solo", len(differ))
    result.check(lost == 0, f"{lost} requests ended without a terminal frame")
    result.check(duplicated == 0, f"{duplicated} terminal frames duplicated or followed by more")
    result.check(
        not failed,
        f"{len(failed)} requests failed, e.g. {[(o.route, o.error, o.transport_error) for o in failed[:3]]}",
    )
    result.check(not differ, f"{len(differ)} greedy outputs differ from their solo runs, e.g. {differ[:3]}")
    for proto, routes in (("zmq", {"zmq"}), ("http", {"/api/generate", "/v1/chat/completions"})):
        mine = [o for _, o in outcomes if o.route in routes and not o.error]
        ttft = [o.ttft_s for o in mine if o.ttft_s is not None]
        total = [o.total_s for o in mine]
        for q in (50, 99):
            result.add(f"{proto} TTFT p{q}", 1000 * percentile(ttft, q), "ms")
            result.add(f"{proto} total p{q}", 1000 * percentile(total, q), "ms")
