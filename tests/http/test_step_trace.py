"""GET /api/trace of a real `tandem serve --trace-steps N`: per-step timings from the scheduler and
the worker (one shared clock), the last N steps kept, refused clearly when tracing is off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import Server, tiny_home

from tandem.messages import STEP_TRACE_FIELDS

CAPACITY = 4


@pytest.fixture(scope="module")
def traced_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    server = Server(tiny_home(tmp_path_factory, tiny_gguf), args=("--trace-steps", str(CAPACITY))).start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


def _generate(server: Server, tokens: int) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_trace_holds_the_last_steps_with_scheduler_and_worker_times(traced_server: Server) -> None:
    _generate(traced_server, 10)  # 10 steps: more than the trace keeps
    r = httpx.get(traced_server.url + "/api/trace", timeout=10)
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["fields"] == list(STEP_TRACE_FIELDS) and t["capacity"] == CAPACITY
    assert t["worker_pid"] == traced_server.worker_pid() and t["scheduler_pid"] not in (0, t["worker_pid"])
    rows = [dict(zip(t["fields"], row, strict=True)) for row in t["steps"]]
    steps = [row["step"] for row in rows]
    assert len(rows) == CAPACITY and steps == list(range(steps[0], steps[0] + CAPACITY)) and steps[0] >= 6
    for row in rows:
        # Each process's stamps in order, and the worker's inside the scheduler's round trip: one clock.
        assert row["prep_start_ns"] <= row["prep_end_ns"] <= row["sent_ns"]
        assert (
            0
            < row["worker_start_ns"]
            <= row["worker_end_ns"]
            < row["result_start_ns"]
            <= row["result_end_ns"]
        )
        assert row["prep_start_ns"] < row["worker_start_ns"]
        assert row["num_seqs"] == 1 and row["num_tokens"] == 1  # decode steps of the one request

    later = httpx.get(traced_server.url + "/api/trace", params={"since": steps[-1]}, timeout=10).json()
    assert [row[0] for row in later["steps"]] == [steps[-1]]
    bad = httpx.get(traced_server.url + "/api/trace", params={"since": "-1"}, timeout=10)
    assert bad.status_code == 400 and "'since'" in bad.json()["error"]


def test_trace_is_refused_when_tracing_is_off(tiny_server: Server) -> None:
    r = httpx.get(tiny_server.url + "/api/trace", timeout=10)
    assert r.status_code == 404
    assert "--trace-steps" in r.json()["error"]
