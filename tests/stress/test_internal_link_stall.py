"""A server process that stalls for a few seconds (SIGSTOP here; a starved machine in the wild) must
cost its requests time, never a frame.

The ipc links between the gateway and a scheduler once carried ZMTP heartbeats (1 s, 3 s timeout):
a stall of 3-5 s, too short for the actor heartbeats (5 s) to call the process hung, timed the link
out, and what was queued on it was dropped without a word: requests the gateway had accepted and
handed on were never answered (the soak's one ZeroMQ request silent for 120 s), and a step's
tokens went missing from every stream. A stall longer than the actor timeout fails the engine's
requests with worker_died, which is an answer too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import zmq.asyncio

from tandem.actors.sockets import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from tandem.client import AsyncTandemClient, TandemError
from tandem.stress.server import StressServer, stress_server

# Past the ZMTP heartbeat timeout (a drop falls 3-4 s into a stall), short of the actor heartbeat
# timeout (5 s, heartbeats every 0.5 s).
STALL_S = (HEARTBEAT_IVL_MS + HEARTBEAT_TIMEOUT_MS) / 1000 + 0.3
REQUESTS = 60
PROMPT_TOKENS = (
    3000  # big frames: the kernel's socket queue fills during the stall, libzmq's pipe holds the rest
)
STREAMS = 8
STREAM_TOKENS = 3500


@pytest.fixture
def server() -> Iterator[StressServer]:
    # one each: a stall past the actor heartbeat on a slow machine leaves the engine dead
    with stress_server() as s:
        yield s


def _pid(server: StressServer, role: str) -> int:
    return server.stats()[role].pid


def test_requests_sent_to_a_stalled_scheduler_are_all_answered(server: StressServer) -> None:
    async def run() -> list[str]:
        ctx = zmq.asyncio.Context()
        zc = AsyncTandemClient(server.zmq_url, timeout=60, zmq_ctx=ctx)
        try:
            hello = await zc.connect()
            ids = [(7 * i) % (hello.vocab_size - 10) + 5 for i in range(PROMPT_TOKENS)]

            async def one(i: int) -> str:
                try:
                    c = await zc.generate(
                        prompt_token_ids=ids, max_tokens=1, ignore_eos=True, request_id=f"stall-{i}"
                    )
                    return str(c.finish_reason)
                except TandemError as e:
                    return str(e.code)

            pid = _pid(server, "tiny scheduler")
            os.kill(pid, signal.SIGSTOP)
            try:
                # Sent once the gateway's side has pinged the stopped scheduler (every second), so
                # that its heartbeat timeout is armed: requests filling the socket first would hold
                # the ping back.
                await asyncio.sleep(HEARTBEAT_IVL_MS / 1000 + 0.2)
                tasks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
                await asyncio.sleep(STALL_S - HEARTBEAT_IVL_MS / 1000 - 0.2)
            finally:
                os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(*tasks)
        finally:
            await zc.close()
            ctx.term()

    ends = Counter(asyncio.run(run()))
    # worker_died: a machine so slow that the actor heartbeat ran out too (an answer, not silence)
    assert set(ends) <= {"length", "worker_died"}, f"requests left unanswered (timeout) or failed: {ends}"


def test_streams_lose_no_token_while_the_gateway_stalls(server: StressServer) -> None:
    async def stream(http: httpx.AsyncClient, i: int, started: asyncio.Event) -> tuple[int, int | None]:
        body = {
            "model": "tiny",
            "prompt": f"stall {i}",
            "max_tokens": STREAM_TOKENS,
            "ignore_eos": True,
            "temperature": 0,
            "logprobs": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        got, usage = 0, None
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                for choice in chunk.get("choices") or []:
                    got += len((choice.get("logprobs") or {}).get("tokens") or [])
                    started.set()
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
        return got, usage

    async def run() -> tuple[list[tuple[int, int | None]], float]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=120, trust_env=False) as http:
            events = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [asyncio.create_task(stream(http, i, e)) for i, e in enumerate(events)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            t0 = time.monotonic()
            os.kill(server.pid, signal.SIGSTOP)  # the gateway: the scheduler keeps stepping
            try:
                await asyncio.sleep(STALL_S)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - t0

    results, after_stall_s = asyncio.run(run())
    # the streams must outlast the stall, or it tested nothing
    assert after_stall_s > STALL_S + 0.5, f"the streams ended {after_stall_s:.1f} s after the stall began"
    assert all(usage == STREAM_TOKENS for _, usage in results), results
    assert all(got == STREAM_TOKENS for got, _ in results), f"tokens received, usage: {results}"
