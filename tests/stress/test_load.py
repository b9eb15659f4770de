"""256 concurrent streaming clients over ZeroMQ and 256 over HTTP (/api/generate and
/v1/chat/completions) on the tiny model: each request ends with exactly one terminal frame and
its greedy output equals the prompt's solo run."""

from __future__ import annotations

from tandem.stress import load


def test_concurrent_streams_each_end_once_and_match_solo(stress_scale: float) -> None:
    r = load.run(stress_scale, clients=256)
    assert r.passed, r.failures
    assert r.figure("requests") == 2 * 256 * max(1, round(stress_scale))
    assert r.figure("lost terminal frames") == 0
    assert r.figure("duplicated terminal frames") == 0
    assert r.figure("outputs differing from solo") == 0
    for proto in ("zmq", "http"):
        assert 0 < r.figure(f"{proto} TTFT p50") <= r.figure(f"{proto} total p99")
