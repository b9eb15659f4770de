"""Scenario 11: many short requests of every kind against two models at once, then a look at
what the server holds.

The mix (seeded, so a run can be repeated): streamed generations over HTTP on either model and
over ZeroMQ, clients that cancel or disconnect mid-stream, grammar-constrained requests (`format`
with a JSON schema) and embeddings (`/api/embed`: the tiny llama embeds too, so no BERT is
needed here; tests/http covers BERT). After a warm-up the server's processes are measured, and
again once the soak has drained: resident memory may grow less than 10%, and open fds, threads
and shm segments not at all; every KV block is free again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
import zmq.asyncio

from tandem.client import AsyncTandemClient, TandemError
from tandem.client.common import new_request_id
from tandem.stress.procstat import ProcStat
from tandem.stress.result import ScenarioResult
from tandem.stress.server import StressServer, keep_log_text, stress_server
from tandem.stress.streams import StreamOutcome, ollama_stream, percentile, zmq_stream

log = logging.getLogger(__name__)

MODELS = ("tiny", "tiny2")
BASE_REQUESTS = 400
CONCURRENCY = 16
SILENT_S = 30.0  # far past any soak request's time: one still open then is logged with the server's view
RSS_GROWTH = 0.10
# Thread pools grow lazily to their caps (asyncio's default executor, the store lanes): over 31,000
# requests the gateway gained one thread after the warm-up. A leak grows with the requests.
THREAD_SLACK = 2
PET = {
    "type": "object",
    "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
    "required": ["kind", "legs"],
    "additionalProperties": False,
}
KINDS = (  # kind, weight
    ("generate", 30),
    ("zmq", 20),
    ("cancel", 10),  # ZeroMQ: cancelled after its first token
    ("disconnect", 10),  # HTTP: the connection closed after the first line
    ("grammar", 15),
    ("embed", 15),
)


@dataclass
class Snapshot:
    procs: dict[str, ProcStat]
    shm: set[str]


def run(scale: float = 1.0, duration_s: float | None = None, seed: int = 0) -> ScenarioResult:
    """``BASE_REQUESTS * scale`` requests; with ``duration_s``, as many as fit in that time instead."""
    count = max(CONCURRENCY * 16, round(BASE_REQUESTS * scale))
    return asyncio.run(_run(count, duration_s, seed))


async def _run(count: int, duration_s: float | None, seed: int) -> ScenarioResult:
    result = ScenarioResult("soak")
    t0 = time.monotonic()
    rng = random.Random(seed)
    kinds = [k for k, w in KINDS for _ in range(w)]
    with stress_server(models=MODELS, kv_cache="32M") as server:
        ctx = zmq.asyncio.Context()
        zc = AsyncTandemClient(server.zmq_url, timeout=120, zmq_ctx=ctx)
        try:
            # Long enough for lazily grown pools (the gateway's thread pool) to reach their size and
            # for the second model to load.
            warm = max(CONCURRENCY * 8, count // 10)
            warmup = await _drive(server, zc, rng, kinds, warm, None)
            after_warmup = Snapshot(server.stats(), server.shm())
            loaded_during = set(server.loaded())
            t_main = time.monotonic()
            outcomes = await _drive(server, zc, rng, kinds, count - warm, duration_s)
            main_s = time.monotonic() - t_main
            end = await _settled(server, after_warmup)
            kv_used = {m: server.ps(m)["kv_blocks_used"] for m in MODELS}
        finally:
            await zc.close()
            ctx.term()
        log_text = server.log_text()
    _judge(result, warmup, outcomes, after_warmup, end, kv_used, loaded_during)
    if not result.passed:  # the request ids in the failures are found in it
        log.warning("the server's log is kept in %s", keep_log_text(log_text, "soak"))
    result.add("requests per second", len(outcomes) / main_s if main_s else 0.0)
    result.check("Traceback" not in log_text, "the server logged a traceback")
    result.seconds = time.monotonic() - t0
    return result


async def _settled(server: StressServer, warm: Snapshot, timeout: float = 5.0) -> Snapshot:
    """The end snapshot, retaken for up to ``timeout`` while some process holds more fds than after
    the warm-up: a socket whose client has just closed is released moments later, a leak stays."""
    deadline = time.monotonic() + timeout
    while True:
        end = Snapshot(server.stats(), server.shm())
        grown = any(role in end.procs and end.procs[role].fds > st.fds for role, st in warm.procs.items())
        if not grown or time.monotonic() > deadline:
            return end
        await asyncio.sleep(0.2)


async def _idle(server: StressServer, timeout: float = 60) -> None:
    """Until neither model has a request running or waiting (cancels take a step to land)."""
    deadline = time.monotonic() + timeout
    while True:
        ps = await asyncio.to_thread(lambda: [server.ps(m) for m in MODELS])
        if all(p["running"] == 0 and p["waiting"] == 0 for p in ps):
            await asyncio.sleep(0.5)  # threads and buffers of the last requests wind down
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not go idle within {timeout:g} s: {ps}")
        await asyncio.sleep(0.1)


async def _drive(
    server: StressServer,
    zc: AsyncTandemClient,
    rng: random.Random,
    kinds: list[str],
    count: int,
    duration_s: float | None,
) -> list[tuple[str, StreamOutcome]]:
    """``count`` requests (or, with ``duration_s``, until then) by CONCURRENCY workers, then until
    the server is idle. The HTTP client is closed by then, so the server holds no connection of
    it when it is measured (the one ZeroMQ connection stays)."""
    plan = iter(range(count)) if duration_s is None else iter(range(10**9))
    stop_at = math.inf if duration_s is None else time.monotonic() + duration_s
    outcomes: list[tuple[str, StreamOutcome]] = []

    async def worker() -> None:
        for i in plan:
            if time.monotonic() > stop_at:
                return
            kind = rng.choice(kinds)
            model = rng.choice(MODELS)
            outcomes.append((kind, await _one(kind, model, i, http, zc, rng)))

    # httpx's default 5 s idle expiry: the server holds idle connections longer (gateway/server.py),
    # so a reuse never races its close.
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(
        base_url=server.http_url, timeout=120, limits=limits, trust_env=False
    ) as http:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await _idle(server)
    return outcomes


async def _one(
    kind: str, model: str, i: int, http: httpx.AsyncClient, zc: AsyncTandemClient, rng: random.Random
) -> StreamOutcome:
    prompt = f"soak {i}: " + " ".join(
        rng.choice(("river", "stone", "cloud", "ember")) for _ in range(rng.randint(1, 12))
    )
    tokens = rng.randint(1, 16)
    if kind == "generate":
        return await ollama_stream(http, model, prompt, {"num_predict": tokens, "temperature": rng.random()})
    if kind == "zmq":
        rid = new_request_id()
        run = zmq_stream(zc, prompt, max_tokens=tokens, temperature=rng.random(), request_id=rid)
        return await _watched(zc, rid, run)
    if kind == "cancel":
        rid = new_request_id()
        return await _watched(zc, rid, _zmq_cancelled(zc, prompt, rid))
    if kind == "disconnect":
        return await _http_disconnect(http, model, prompt)
    if kind == "grammar":
        return await _grammar(http, model, prompt)
    return await _embed(http, model, prompt)


async def _zmq_cancelled(zc: AsyncTandemClient, prompt: str, rid: str) -> StreamOutcome:
    out = StreamOutcome("zmq cancel", request_id=rid)
    t0 = time.perf_counter()
    s = zc.stream(prompt, raw=True, max_tokens=200, ignore_eos=True, request_id=rid)
    try:
        async with s:
            async for _ in s:
                break  # leaving the block cancels the request on the server
        out.status, out.terminals = 200, 1
    except TandemError as e:
        out.error, out.transport_error = e.code, str(e)
    out.accepted = s.state.accepted is not None
    out.total_s = time.perf_counter() - t0
    return out


async def _watched(zc: AsyncTandemClient, rid: str, run: Coroutine[Any, Any, StreamOutcome]) -> StreamOutcome:
    """A ZeroMQ request still open after SILENT_S is logged with what the server holds then, while
    it is still in flight: the front end's requests and the scheduler's queue tell a request lost
    on its way in from one stuck inside (the stream reader adds whether it was accepted)."""
    task = asyncio.ensure_future(run)
    done, _ = await asyncio.wait({task}, timeout=SILENT_S)
    if done:
        return task.result()
    view = await _server_view(zc)
    log.error("ZeroMQ request %s silent for %g s; %s", rid, SILENT_S, view)
    out = await task
    if out.transport_error:
        out.transport_error += f"; after {SILENT_S:g} s {view}"
    return out


async def _server_view(zc: AsyncTandemClient) -> str:
    try:
        h = await zc.health(timeout=10)
    except TandemError as e:
        return f"the server did not answer health: {e}"
    view = f"server {h.status}, {h.inflight} ZeroMQ requests in flight"
    if h.stats is not None:
        view += f", scheduler running {h.stats.running} waiting {h.stats.waiting}"
    return f"{view}; {h.error}" if h.error else view


async def _http_disconnect(http: httpx.AsyncClient, model: str, prompt: str) -> StreamOutcome:
    out = StreamOutcome("/api/generate disconnect")
    t0 = time.perf_counter()
    body = {"model": model, "prompt": prompt, "options": {"num_predict": 200, "ignore_eos": True}}
    try:
        async with http.stream("POST", "/api/generate", json=body) as r:
            out.status = r.status_code
            async for _ in r.aiter_lines():
                break  # closing the response drops the connection mid-stream
        out.terminals = 1
    except httpx.HTTPError as e:
        out.transport_error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    return out


async def _grammar(http: httpx.AsyncClient, model: str, prompt: str) -> StreamOutcome:
    out = StreamOutcome("/api/generate format")
    t0 = time.perf_counter()
    body = {"model": model, "prompt": prompt, "stream": False, "format": PET, "options": {"num_predict": 64}}
    try:
        r = await http.post("/api/generate", json=body)
        out.status = r.status_code
        data = r.json()
        out.terminals = 1
        out.finish_reason = data.get("done_reason")
        out.text = data.get("response", "")
        out.error = data.get("error")
        if out.finish_reason == "stop" and not _pet_ok(out.text):
            out.error = f"the reply does not match its schema: {out.text!r}"
    except httpx.HTTPError as e:
        out.transport_error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    return out


def _pet_ok(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(obj, dict)
        and set(obj) == {"kind", "legs"}
        and obj["kind"] in ("cat", "dog")
        and isinstance(obj["legs"], int)
        and 0 <= obj["legs"] <= 8
    )


async def _embed(http: httpx.AsyncClient, model: str, prompt: str) -> StreamOutcome:
    out = StreamOutcome("/api/embed")
    t0 = time.perf_counter()
    try:
        r = await http.post("/api/embed", json={"model": model, "input": [prompt, prompt[::-1]]})
        out.status = r.status_code
        data = r.json()
        out.terminals = 1
        vectors = data.get("embeddings") or []
        if r.status_code != 200 or len(vectors) != 2 or not all(math.isfinite(x) for v in vectors for x in v):
            out.error = str(data.get("error") or f"{len(vectors)} embeddings")
    except httpx.HTTPError as e:
        out.transport_error = f"{type(e).__name__}: {e}"
    out.total_s = time.perf_counter() - t0
    return out


def _judge(
    result: ScenarioResult,
    warmup: list[tuple[str, StreamOutcome]],
    outcomes: list[tuple[str, StreamOutcome]],
    warm: Snapshot,
    end: Snapshot,
    kv_used: dict[str, int],
    loaded: set[str],
) -> None:
    """Latency and rate from the requests after the warm-up; the checks on all of them."""
    main = outcomes
    outcomes = warmup + outcomes
    by_kind = Counter(k for k, _ in outcomes)
    failed = [
        (k, o.error or o.transport_error)
        for k, o in outcomes
        if o.error or o.transport_error or o.status != 200
    ]
    bad_ends = [
        (k, o.terminals, o.after_terminal) for k, o in outcomes if o.terminals != 1 or o.after_terminal
    ]
    grammar = [o for k, o in outcomes if k == "grammar"]
    result.add("requests", len(outcomes))
    for kind, _ in KINDS:
        result.add(f"{kind} requests", by_kind[kind])
    result.add("failed requests", len(failed))
    result.add(
        "grammar replies complete and valid",
        sum(1 for o in grammar if o.finish_reason == "stop" and not o.error),
    )
    for kind in ("generate", "zmq", "grammar", "embed"):
        mine = [o.total_s for k, o in main if k == kind]
        result.add(f"{kind} total p50", 1000 * percentile(mine, 50), "ms")
        result.add(f"{kind} total p99", 1000 * percentile(mine, 99), "ms")
    result.check(not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}")
    result.check(not bad_ends, f"{len(bad_ends)} requests without exactly one terminal frame: {bad_ends[:3]}")
    result.check(set(MODELS) <= loaded, f"both models should have been loaded at once, saw {sorted(loaded)}")
    for model, used in kv_used.items():
        result.add(f"{model} KV blocks used at the end", used)
        result.check(used == 0, f"{model}: {used} KV blocks still used at the end")
    for role, st in warm.procs.items():
        now = end.procs.get(role)
        if now is None:
            result.check(False, f"{role} (pid {st.pid}) is gone")
            continue
        growth = (now.rss_kb - st.rss_kb) / st.rss_kb
        result.add(f"{role} RSS growth", 100 * growth, "%")
        result.add(f"{role} fd growth", now.fds - st.fds)
        result.add(f"{role} thread growth", now.threads - st.threads)
        result.check(
            growth < RSS_GROWTH, f"{role}: RSS grew {100 * growth:.1f}% ({st.rss_kb} -> {now.rss_kb} kB)"
        )
        result.check(now.fds <= st.fds, f"{role}: open fds grew {st.fds} -> {now.fds}")
        result.check(
            now.threads <= st.threads + THREAD_SLACK, f"{role}: threads grew {st.threads} -> {now.threads}"
        )
    result.add("shm segment growth", len(end.shm) - len(warm.shm))
    result.check(end.shm <= warm.shm, f"new shm segments: {sorted(end.shm - warm.shm)}")
