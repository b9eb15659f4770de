"""/metrics and /health on a live server; its Host guard and body limit are in
tests/stress/test_http_security.py."""

from __future__ import annotations

import httpx
import pytest
from live_server import Server
from prometheus_client.parser import text_string_to_metric_families

TINY = (("model", "tiny:latest"),)  # the label of every per-model metric


def scrape(server: Server) -> dict[str, dict[tuple, float]]:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_cover_requests_queue_kv_tokens_latency(server_after_traffic: Server) -> None:
    m = scrape(server_after_traffic)
    ok = m["tandem_http_requests_total"][(("route", "/api/generate"), ("status", "200"))]
    assert ok >= 2
    assert m["tandem_http_requests_total"][(("route", "/api/generate"), ("status", "404"))] >= 1
    assert m["tandem_http_requests_total"][(("route", "/v1/chat/completions"), ("status", "200"))] >= 1
    for gauge in (
        "tandem_queue_depth",
        "tandem_running_sequences",
        "tandem_kv_blocks_used",
        "tandem_kv_blocks_free",
    ):
        assert m[gauge][TINY] >= 0
    assert (
        m["tandem_kv_blocks_used"][TINY] + m["tandem_kv_blocks_free"][TINY]
        == m["tandem_kv_blocks_total"][TINY]
    )
    assert m["tandem_prompt_tokens_total"][TINY] > 0 and m["tandem_generation_tokens_total"][TINY] >= 10
    assert m["tandem_time_to_first_token_seconds_count"][TINY] >= 2
    assert m["tandem_inter_token_latency_seconds_count"][TINY] >= 8
    assert m["tandem_step_time_seconds"][TINY] > 0 and m["tandem_gpu_idle_seconds"][TINY] >= 0
    assert m["tandem_overlap_enabled"][TINY] == 1 and m["tandem_worker_alive"][TINY] == 1
    assert m["tandem_request_outcomes_total"][(*TINY, ("reason", "length"))] >= 2


@pytest.fixture(scope="module")
def server_after_traffic(tiny_server: Server) -> Server:
    with tiny_server.client() as c:
        for _ in range(2):
            body = {
                "model": "tiny",
                "prompt": "count",
                "stream": False,
                "options": {"num_predict": 5, "ignore_eos": True},
            }
            assert c.post("/api/generate", json=body).status_code == 200
        assert c.post("/api/generate", json={"model": "nope", "prompt": "x"}).status_code == 404
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
    return tiny_server


def test_health(tiny_server: Server) -> None:
    r = httpx.get(tiny_server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
