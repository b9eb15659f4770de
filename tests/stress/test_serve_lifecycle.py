"""`tandem serve` shutdown: SIGTERM drains in-flight requests then exits 0; a second SIGINT forces."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import Server, tiny_home
from procs import descendants, running

from tandem.shm import list_segments


def _stream_lines(server: Server, body: dict, lines: list[dict], started: threading.Event) -> None:
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream("POST", "/api/generate", json=body) as r,
    ):
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
                started.set()
    started.set()


def _no_segments_of(pids: set[int]) -> bool:
    return not [s for s in list_segments() if int(s.split("-")[1]) in pids]


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_shutdown(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, signals: tuple[int, ...]
) -> None:
    server = Server(tiny_home(tmp_path_factory, tiny_gguf)).start()
    try:
        assert server.proc is not None
        n = 1500
        body = {"model": "tiny", "prompt": "hello", "options": {"num_predict": n, "ignore_eos": True}}
        lines: list[dict] = []
        started = threading.Event()
        t = threading.Thread(target=_stream_lines, args=(server, body, lines, started), daemon=True)
        t.start()
        assert started.wait(30)
        children = server.children | {server.proc.pid}
        for sig in signals:
            server.proc.send_signal(sig)
            time.sleep(0.05)
        t0 = time.monotonic()
        code = server.proc.wait(60)
        elapsed = time.monotonic() - t0
        t.join(30)
        last = lines[-1]
        if len(signals) == 1:  # drained: the request ran to its end, then a clean exit
            assert code == 0, server.log.read_text()[-3000:]
            assert last.get("done") is True and last.get("done_reason") == "length", last
            assert last["eval_count"] == n
        else:  # forced: the stream ends with an error object, quickly
            assert elapsed < 15
            assert "error" in last or last.get("done_reason") != "length", last
        deadline = time.monotonic() + 10
        while any(running(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if running(p)], "processes left behind"
        assert _no_segments_of(children), "shared-memory segments left behind"
    finally:
        server.stop()


def _scheduler_pid(server: Server) -> int:
    assert server.proc is not None
    for pid in descendants(server.proc.pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmd and Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1] == str(
            server.proc.pid
        ):
            return pid
    raise AssertionError("no scheduler process found")


def test_requests_arriving_after_a_scheduler_crash_get_worker_died(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
) -> None:
    """Requests sent in the moments after the scheduler dies, before the gateway has noticed,
    get the same worker_died / 503 as everyone else: never a 500 or a 'cancelled' finish."""
    from tandem.client import TandemClient, TandemError

    server = Server(tiny_home(tmp_path_factory, tiny_gguf)).start()
    zmq_url = server.ps()["zmq"][0]
    http: list[tuple[int, str]] = []
    zmq: list[str] = []
    stop = threading.Event()
    body = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 2}}

    def http_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=20) as c:
            while not stop.is_set():
                try:
                    r = c.post("/api/generate", json=body)
                except httpx.TransportError as e:  # refused, reset or dropped without an answer
                    http.append((0, repr(e)))
                    return
                http.append((r.status_code, r.json().get("done_reason") or r.json().get("error", "")))

    def zmq_loop() -> None:
        with TandemClient(zmq_url, timeout=20) as c:
            while not stop.is_set():
                try:
                    done = c.generate("x", max_tokens=2)
                    zmq.append(done.finish_reason or "")
                except TandemError as e:
                    zmq.append(e.code)
                    if e.code in ("worker_died", "shutting_down", "connection", "timeout"):
                        return

    threads = [threading.Thread(target=f) for f in [http_loop] * 6 + [zmq_loop] * 2]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(_scheduler_pid(server), signal.SIGKILL)
    # The server answers for a grace second after noticing (within 0.2 s), then exits: requests
    # sent until then must all be answered.
    time.sleep(0.6)
    stop.set()
    assert server.proc is not None
    server.proc.wait(30)
    for t in threads:
        t.join(30)
    assert server.proc.returncode != 0
    assert http and zmq
    assert all(s in (200, 503) for s, _ in http), [x for x in http if x[0] not in (200, 503)]
    assert all(reason in ("length", "stop") for s, reason in http if s == 200), http
    assert all("SIGKILL" in reason or "died" in reason for s, reason in http if s == 503), http
    assert "cancelled" not in zmq, zmq
    assert zmq[-1] in ("worker_died", "connection", "timeout"), zmq
    server.stop()
