"""The ZeroMQ client connection dropped by its heartbeat (a stall past 3 s at either end): every
request the client sent gets frames or an error, never silence, and the server keeps nothing of
the old connection.

The client fails what it had in flight with `disconnected`; a request it sends while the
connection is down waits in its socket and runs once it has reconnected (or, sent just before the
client saw the drop, fails with `disconnected` too). The server cancels the old peer's requests
when a send to it fails (ROUTER_MANDATORY) or its probe finds it gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import zmq.asyncio

from tandem.actors.sockets import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from tandem.client import AsyncTandemClient
from tandem.stress.server import StressServer, stress_server
from tandem.stress.streams import StreamOutcome, zmq_stream

STALL_S = (HEARTBEAT_IVL_MS + HEARTBEAT_TIMEOUT_MS) / 1000 + 0.3  # past the heartbeat's drop (3-4 s)
SEND_FOR_S = 10.0  # a request every 50 ms, open loop: some go out while the connection is down
CLIENT_TIMEOUT_S = 30.0  # a request silent this long is the defect
ANSWERS = {"length", "disconnected"}

# A client in its own process, so that it can be stopped: its requests' ends and then what the
# server still holds, as one JSON line.
CLIENT = """
import asyncio, json, sys, time
from collections import Counter
import zmq.asyncio
from tandem.client import AsyncTandemClient
from tandem.stress.streams import zmq_stream

async def main(url, send_for, timeout):
    ctx = zmq.asyncio.Context()
    zc = AsyncTandemClient(url, timeout=timeout, zmq_ctx=ctx)
    await zc.connect()
    outs, stop_at = [], time.monotonic() + send_for
    async def one(i):
        outs.append(await zmq_stream(zc, f"stalled client {i}", max_tokens=200, ignore_eos=True))
    tasks = []
    print("started", flush=True)
    while time.monotonic() < stop_at:
        tasks.append(asyncio.create_task(one(len(tasks))))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    for _ in range(50):  # cancels take a step to land
        h = await zc.health()
        if h.inflight == 0 and h.stats is not None and h.stats.running + h.stats.waiting == 0:
            break
        await asyncio.sleep(0.1)
    ends = Counter(str(o.error or o.finish_reason) for o in outs)
    print(json.dumps({"ends": ends, "inflight": h.inflight, "clients": h.clients,
                      "running": h.stats and h.stats.running, "waiting": h.stats and h.stats.waiting}))
    await zc.close()
    ctx.term()

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
"""


@pytest.fixture(scope="module")
def server() -> Iterator[StressServer]:
    with stress_server() as s:
        yield s


def test_a_stalled_client_gets_an_answer_for_every_request(server: StressServer) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", CLIENT, server.zmq_url, str(SEND_FOR_S), str(CLIENT_TIMEOUT_S)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(2.0)  # requests in flight
        os.kill(child.pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_S)
        finally:
            os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(timeout=SEND_FOR_S + CLIENT_TIMEOUT_S + 60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0
    seen = json.loads(out.strip().splitlines()[-1])
    assert set(seen["ends"]) <= ANSWERS, f"a request went unanswered (timeout) or failed: {seen}"
    assert seen["ends"].get("disconnected", 0) > 0, (
        f"the stall dropped no connection, so tested nothing: {seen}"
    )
    # the old connection's requests were cancelled: the server holds only what the new one has (none)
    assert (seen["inflight"], seen["running"], seen["waiting"]) == (0, 0, 0), seen


def test_requests_sent_while_the_gateway_stalls_are_all_answered(server: StressServer) -> None:
    async def run() -> list[tuple[float, StreamOutcome]]:
        ctx = zmq.asyncio.Context()
        zc = AsyncTandemClient(server.zmq_url, timeout=CLIENT_TIMEOUT_S, zmq_ctx=ctx)
        try:
            await zc.connect()
            outs: list[tuple[float, StreamOutcome]] = []

            async def one(i: int) -> None:
                t = time.monotonic()
                outs.append((t, await zmq_stream(zc, f"stalled gateway {i}", max_tokens=8, ignore_eos=True)))

            async def stall() -> None:
                await asyncio.sleep(2.0)
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(STALL_S)  # this loop runs on: its sends queue in the client
                finally:
                    os.kill(server.pid, signal.SIGCONT)

            tasks, stop_at = [asyncio.create_task(stall())], time.monotonic() + SEND_FOR_S
            while time.monotonic() < stop_at:
                tasks.append(asyncio.create_task(one(len(tasks))))
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
            return outs
        finally:
            await zc.close()
            ctx.term()

    outs = asyncio.run(run())
    ends = Counter(str(o.error or o.finish_reason) for _, o in outs)
    assert set(ends) <= ANSWERS, f"a request went unanswered (timeout) or failed: {ends}"
    assert ends["disconnected"] > 0, f"the stall dropped no connection, so tested nothing: {ends}"
    # after the reconnect requests run again
    last_failure = max(t for t, o in outs if o.error)
    assert any(t > last_failure and o.finish_reason == "length" for t, o in outs), ends
