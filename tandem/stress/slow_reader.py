"""Scenario 10: clients that stop reading a long stream, over HTTP and ZeroMQ.

While they stall, the gateway's and scheduler's memory stays bounded and other clients are served
as if nothing happened (their greedy outputs equal their solo runs). After `--send-timeout` each
stalled request is cancelled and its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

import httpx
import zmq
import zmq.asyncio

from tandem.client import AsyncTandemClient
from tandem.messages import PROTOCOL_VERSION, ClientHello, GenerateRequest, SamplingParams, encode
from tandem.stress.result import ScenarioResult
from tandem.stress.server import StressServer, stress_server
from tandem.stress.streams import StreamOutcome, ollama_stream, percentile, zmq_stream

LONG_TOKENS = 4000  # at the tiny model's speed, tens of seconds: far longer than the send timeout
RSS_BOUND_KB = 32 * 1024  # growth allowed per process while the readers stall
PROMPTS = tuple(f"bystander {i} says" for i in range(4))


def run(scale: float = 1.0, stalled: int = 4, send_timeout: float = 2.0) -> ScenarioResult:
    """``stalled`` HTTP readers stall, then as many ZeroMQ ones; ``scale`` times over."""
    return asyncio.run(_run(max(1, round(scale)), stalled, send_timeout))


@dataclass
class Phase:
    """One protocol's stall: how long until its requests were cut off, what they generated
    meanwhile, and how the bystanders fared."""

    seconds: float = 0.0
    tokens: float = 0.0
    bystanders: list[StreamOutcome] = field(default_factory=list)
    differ: int = 0
    peak_rss_kb: dict[str, int] = field(default_factory=dict)
    kv_used_after: int = 0


async def _run(rounds: int, stalled: int, send_timeout: float) -> ScenarioResult:
    result = ScenarioResult("slow_reader")
    t0 = time.monotonic()
    with stress_server(args=("--send-timeout", str(send_timeout))) as server:
        ctx = zmq.asyncio.Context()
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120, trust_env=False) as http:
            zc = AsyncTandemClient(server.zmq_url, timeout=120, zmq_ctx=ctx)
            try:
                solo = {p: await _bystander(http, zc, p) for p in PROMPTS}
                before = server.stats()
                phases: dict[str, list[Phase]] = {"http": [], "zmq": []}
                for _ in range(rounds):
                    for proto in phases:
                        phases[proto].append(await _phase(server, proto, stalled, http, zc, ctx, solo))
            finally:
                await zc.close()
                ctx.term()
        log = server.log_text()
    for proto, runs in phases.items():
        _judge(result, proto, runs, stalled)
    for role, st in before.items():
        grew = max(ph.peak_rss_kb.get(role, 0) for runs in phases.values() for ph in runs) - st.rss_kb
        result.add(f"{role} RSS growth", max(0, grew) / 1024, "MiB")
        if not role.endswith("worker"):  # the worker's memory is its model's and KV pool's
            result.check(grew < RSS_BOUND_KB, f"{role} RSS grew {grew} kB while readers stalled")
    result.add("send timeout", send_timeout, "s")
    result.check(
        "client stopped reading for" in log, "the server did not log the HTTP clients that stopped reading"
    )
    result.seconds = time.monotonic() - t0
    return result


async def _phase(
    server: StressServer,
    proto: str,
    stalled: int,
    http: httpx.AsyncClient,
    zc: AsyncTandemClient,
    ctx: zmq.asyncio.Context,
    solo: dict[str, list[StreamOutcome]],
) -> Phase:
    ph = Phase()
    generated_before = server.metric("tandem_generation_tokens_total")
    t_stall = time.monotonic()
    if proto == "http":
        held: list[socket.socket | zmq.asyncio.Socket] = [_stalled_http(server) for _ in range(stalled)]
    else:
        held = [await _stalled_zmq(ctx, server) for _ in range(stalled)]
    await _until(lambda: server.ps()["running"] >= stalled, 30, "the stalled requests to start")
    while not ph.bystanders or (server.ps()["running"] > 0 and len(ph.bystanders) < 400):
        for p in PROMPTS:
            got = await _bystander(http, zc, p)
            ph.bystanders += got
            ph.differ += sum(1 for a, b in zip(got, solo[p], strict=True) if a.text != b.text)
        for role, st in server.stats().items():
            ph.peak_rss_kb[role] = max(ph.peak_rss_kb.get(role, 0), st.rss_kb)
    await _until(lambda: server.ps()["running"] == 0, 60, "the stalled requests to be cancelled")
    ph.seconds = time.monotonic() - t_stall
    ph.tokens = server.metric("tandem_generation_tokens_total") - generated_before
    ph.kv_used_after = server.ps()["kv_blocks_used"]
    for h in held:
        if isinstance(h, socket.socket):
            h.close()
        else:
            h.close(linger=0)
    return ph


def _judge(result: ScenarioResult, proto: str, runs: list[Phase], stalled: int) -> None:
    everyone = [o for ph in runs for o in ph.bystanders]
    failed = [o for o in everyone if o.error or o.transport_error or o.terminals != 1]
    differ = sum(ph.differ for ph in runs)
    result.add(f"{proto} stalled streams", stalled * len(runs))
    result.add(f"{proto} stalled requests cancelled after", max(ph.seconds for ph in runs), "s")
    result.add(f"{proto} tokens generated per stalled stream", max(ph.tokens for ph in runs) / stalled)
    result.add(f"{proto} KV blocks used after", max(ph.kv_used_after for ph in runs))
    result.add(f"{proto} bystander requests", len(everyone))
    result.add(f"{proto} bystanders failed", len(failed))
    result.add(f"{proto} bystander total p99", 1000 * percentile([o.total_s for o in everyone], 99), "ms")
    result.check(
        not failed, f"{proto}: {len(failed)} bystanders failed: {[(o.route, o.error) for o in failed[:3]]}"
    )
    result.check(differ == 0, f"{proto}: {differ} bystander outputs differ from their solo runs")
    for ph in runs:
        result.check(
            ph.kv_used_after == 0, f"{proto}: {ph.kv_used_after} KV blocks still used after the cancels"
        )
        # Cut off before the end: bystanders make 8 tokens each, the rest is the stalled ones'. How
        # far a stalled stream gets is what the connection's buffers hold (bytes, so more tokens
        # for ZeroMQ's small frames than for HTTP's NDJSON lines) before the send timeout starts.
        per_stream = (ph.tokens - 8 * len(ph.bystanders)) / stalled
        result.check(
            per_stream < 0.9 * LONG_TOKENS, f"{proto}: stalled streams ran on ({per_stream:.0f} tokens each)"
        )


async def _until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        await asyncio.sleep(0.2)


async def _bystander(http: httpx.AsyncClient, zc: AsyncTandemClient, prompt: str) -> list[StreamOutcome]:
    return list(
        await asyncio.gather(
            ollama_stream(http, "tiny", prompt, {"temperature": 0, "num_predict": 8, "ignore_eos": True}),
            zmq_stream(zc, prompt, temperature=0.0, max_tokens=8, ignore_eos=True),
        )
    )


def _stalled_http(server: StressServer) -> socket.socket:
    """A long stream over a bare socket whose answer is never read; the small receive buffer, set
    before connecting, sizes the TCP window so the server's writes block soon."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", int(server.http_url.rsplit(":", 1)[1])))
    body = {
        "model": "tiny",
        "prompt": "hi",
        "raw": True,
        "options": {"num_predict": LONG_TOKENS, "ignore_eos": True},
    }
    data = json.dumps(body).encode()
    s.sendall(
        f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


async def _stalled_zmq(ctx: zmq.asyncio.Context, server: StressServer) -> zmq.asyncio.Socket:
    """A DEALER that asks for a long stream and never reads it: tiny receive queues on its side, so
    the server's own send queue (its high-water mark) fills."""
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.RCVHWM, 1)
    d.setsockopt(zmq.RCVBUF, 4096)
    d.connect(server.zmq_url)
    await d.send(encode(ClientHello(PROTOCOL_VERSION, "stalled")))
    params = SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True)
    await d.send(encode(GenerateRequest(f"stall-{id(d)}", "hi", raw=True, params=params)))
    return d
