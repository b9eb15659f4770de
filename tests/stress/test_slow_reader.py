"""Clients that stop reading a long stream (HTTP, then ZeroMQ) are cancelled once their buffers
fill and --send-timeout passes: their KV blocks are freed, the gateway's and scheduler's memory
stays bounded, and other clients are served meanwhile with the outputs they get alone."""

from __future__ import annotations

from tandem.stress import slow_reader


def test_clients_that_stop_reading_are_cancelled(stress_scale: float) -> None:
    r = slow_reader.run(stress_scale, stalled=4, send_timeout=2.0)
    assert r.passed, r.failures
    for proto in ("http", "zmq"):
        assert r.figure(f"{proto} KV blocks used after") == 0
        assert r.figure(f"{proto} bystander requests") > 0
        assert r.figure(f"{proto} tokens generated per stalled stream") < slow_reader.LONG_TOKENS
    assert r.figure("gateway RSS growth") < 32
