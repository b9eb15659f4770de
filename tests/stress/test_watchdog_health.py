"""A worker whose compute hangs while its heartbeats go on: /health turns `degraded`, the stream
ends with an error within seconds, the worker is restarted and /health is `ok` again."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import LONG, Server, tiny_home, wait_for


def test_hung_step_degrades_health_then_restarts(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path
) -> None:
    server = Server(
        tiny_home(tmp_path_factory, tiny_gguf), args=("--step-timeout", "2", "--inject-fault", "hang@8")
    ).start()
    try:
        lines: list[dict] = []

        def stream() -> None:
            body = {"model": "tiny", "prompt": "hi", "raw": True, "options": LONG}
            with (
                httpx.Client(base_url=server.url, timeout=60) as c,
                c.stream("POST", "/api/generate", json=body) as r,
            ):
                lines.extend(json.loads(x) for x in r.iter_lines() if x)

        t = threading.Thread(target=stream)
        t.start()
        seen: set[str] = set()
        deadline = time.monotonic() + 20
        with server.client() as c:
            while t.is_alive() and time.monotonic() < deadline:
                seen.add(c.get("/health").json()["status"])
                time.sleep(0.1)
        t.join(5)
        assert "degraded" in seen, seen
        assert lines and "error" in lines[-1] and "no progress" in lines[-1]["error"], lines[-1:]
        with server.client() as c:
            wait_for(lambda: c.get("/health").json()["status"] == "ok", timeout=30)
            r = c.post(
                "/api/generate",
                json={"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 3}},
            )
            assert r.status_code == 200 and r.json()["eval_count"] == 3
    finally:
        assert server.stop() == 0
