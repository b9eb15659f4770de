"""`tandem serve` shutdown: SIGTERM drains in-flight requests then exits 0; a second SIGINT forces."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import Server, pid_alive, tiny_home

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
        while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in children if pid_alive(p)], "processes left behind"
        assert _no_segments_of(children), "shared-memory segments left behind"
    finally:
        server.stop()
