"""Scenario 9: more requests at once than `--max-queue` holds.

The excess must be refused at once (HTTP 503 with Retry-After, a ZeroMQ `busy` error with its
retry estimate), no connection is reset, and every accepted request runs to its end.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import zmq.asyncio

from tandem.client import AsyncTandemClient
from tandem.stress.result import ScenarioResult
from tandem.stress.server import stress_server
from tandem.stress.streams import StreamOutcome, chat_stream, ollama_stream, percentile, zmq_stream

MAX_QUEUE = 16
MAX_SEQS = 4
TOKENS = 200  # long enough that the first admitted are still running when the last arrive


def run(scale: float = 1.0, burst: int = 40) -> ScenarioResult:
    """``scale`` bursts of ``burst`` requests per protocol (HTTP first, then ZeroMQ)."""
    return asyncio.run(_run(max(1, round(scale)), burst))


async def _run(rounds: int, burst: int) -> ScenarioResult:
    result = ScenarioResult("overflow")
    t0 = time.monotonic()
    args = ("--max-queue", str(MAX_QUEUE), "--max-num-seqs", str(MAX_SEQS))
    with stress_server(args=args) as server:
        http_runs: list[list[StreamOutcome]] = []
        zmq_runs: list[list[StreamOutcome]] = []
        limits = httpx.Limits(max_connections=burst + 4)
        async with httpx.AsyncClient(
            base_url=server.http_url, timeout=300, limits=limits, trust_env=False
        ) as http:
            ctx = zmq.asyncio.Context()
            clients = [AsyncTandemClient(server.zmq_url, timeout=300, zmq_ctx=ctx) for _ in range(burst)]
            try:
                await asyncio.gather(*(c.connect() for c in clients))
                for _ in range(rounds):
                    http_runs.append(await _http_burst(http, burst))
                    zmq_runs.append(await _zmq_burst(clients))
            finally:
                await asyncio.gather(*(c.close() for c in clients))
                ctx.term()
        ps = server.ps()
        result.check(
            ps["kv_blocks_used"] == 0, f"KV blocks still used after the bursts: {ps['kv_blocks_used']}"
        )
        result.check(ps["waiting"] == 0 and ps["running"] == 0, f"requests left behind: {ps}")
        log = server.log_text()
    for proto, runs in (("http", http_runs), ("zmq", zmq_runs)):
        _judge(result, proto, runs, burst)
    result.check("Traceback" not in log, "the server logged a traceback")
    result.seconds = time.monotonic() - t0
    return result


async def _http_burst(http: httpx.AsyncClient, burst: int) -> list[StreamOutcome]:
    options = {"num_predict": TOKENS, "ignore_eos": True}
    tasks = [
        ollama_stream(http, "tiny", f"burst {i}", options)
        if i % 2 == 0
        else chat_stream(http, "tiny", f"burst {i}", max_tokens=TOKENS, ignore_eos=True)
        for i in range(burst)
    ]
    return list(await asyncio.gather(*tasks))


async def _zmq_burst(clients: list[AsyncTandemClient]) -> list[StreamOutcome]:
    return list(
        await asyncio.gather(
            *(zmq_stream(c, f"burst {i}", max_tokens=TOKENS, ignore_eos=True) for i, c in enumerate(clients))
        )
    )


def _refused(proto: str, o: StreamOutcome) -> bool:
    return o.status == 503 if proto == "http" else o.error == "busy"


def _judge(result: ScenarioResult, proto: str, runs: list[list[StreamOutcome]], burst: int) -> None:
    for outcomes in runs:
        accepted = [o for o in outcomes if o.status == 200 and not _refused(proto, o)]
        refused = [o for o in outcomes if _refused(proto, o)]
        other = [o for o in outcomes if o not in accepted and o not in refused]
        resets = [o.transport_error for o in outcomes if o.transport_error]
        result.check(not resets, f"{proto}: {len(resets)} connections broken, e.g. {resets[:1]}")
        result.check(not other, f"{proto}: answers neither accepted nor busy: {[o.error for o in other][:3]}")
        result.check(
            len(accepted) >= MAX_QUEUE, f"{proto}: only {len(accepted)} accepted; the queue holds {MAX_QUEUE}"
        )
        result.check(bool(refused), f"{proto}: none of {burst} requests was refused")
        unfinished = [
            (o.finish_reason, o.error) for o in accepted if o.terminals != 1 or o.finish_reason != "length"
        ]
        result.check(
            not unfinished, f"{proto}: accepted requests that did not run to their end: {unfinished[:3]}"
        )
        no_retry = [o for o in refused if not o.retry_after or o.retry_after <= 0]
        result.check(not no_retry, f"{proto}: {len(no_retry)} busy answers without a retry estimate")
        # "At once": a refusal does not wait in the queue for room. Had it waited, it would have come
        # only when the accepted requests were done (MAX_QUEUE + MAX_SEQS of them, TOKENS each, four
        # at a time); every one came before the last accepted request finished.
        last_done = max((o.total_s for o in accepted), default=0.0)
        late = [o for o in refused if o.total_s >= last_done]
        result.check(
            not late, f"{proto}: {len(late)} refusals came only after the accepted requests had finished"
        )
    every = [o for outcomes in runs for o in outcomes]
    refused_all = [o for o in every if _refused(proto, o)]
    result.add(f"{proto} accepted", sum(1 for o in every if o.status == 200 and not _refused(proto, o)))
    result.add(f"{proto} refused busy", len(refused_all))
    result.add(f"{proto} connection resets", sum(1 for o in every if o.transport_error))
    result.add(f"{proto} refusal p99", 1000 * percentile([o.total_s for o in refused_all], 99), "ms")
