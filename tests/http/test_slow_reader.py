"""A client that stops reading its stream is cancelled after --send-timeout: its KV blocks are
freed, the gateway's memory for it stays bounded, and other clients are served meanwhile."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from live_server import LONG, Server, raw_post, tiny_home, wait_for


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_stops_reading_is_cancelled(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
) -> None:
    server = Server(tiny_home(tmp_path_factory, tiny_gguf), args=("--send-timeout", "2")).start()
    try:
        assert server.proc is not None
        body = {"model": "tiny", "prompt": "hi", "raw": True, "options": {**LONG, "num_predict": 4000}}
        stalled = [raw_post(server, "/api/generate", body, rcvbuf=4096) for _ in range(4)]
        wait_for(lambda: server.ps()["running"] == 4, timeout=10)
        rss_before = _rss_kb(server.proc.pid)
        # Others are served while the stalled streams fill their buffers.
        with server.client() as c:
            r = c.post(
                "/api/generate",
                json={"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 8}},
            )
            assert r.status_code == 200 and r.json()["eval_count"] == 8
        t0 = time.monotonic()
        wait_for(lambda: server.ps()["running"] == 0, timeout=60, step=0.2)
        took = time.monotonic() - t0
        ps = server.ps()
        assert ps["kv_blocks_used"] == 0, ps
        # Each stalled request was cut off long before its 4000 tokens (about 20 s here).
        assert took < 30, took
        assert _rss_kb(server.proc.pid) - rss_before < 16 * 1024
        for s in stalled:
            s.close()
        assert "stopped reading" in server.log.read_text()
    finally:
        assert server.stop() == 0
