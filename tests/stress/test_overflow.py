"""40 requests at once against --max-queue 16 (4 running): the excess are refused at once (HTTP
503 with Retry-After, ZeroMQ busy with retry_after_s), nothing is reset, the accepted finish.
(tests/http/test_http_errors.py keeps the one-slot queue tests: a queued client that leaves, and
Retry-After against the actual wait.)"""

from __future__ import annotations

from tandem.stress import overflow


def test_burst_over_the_queue_is_refused_busy_and_the_rest_finish(stress_scale: float) -> None:
    r = overflow.run(stress_scale, burst=40)
    assert r.passed, r.failures
    rounds = max(1, round(stress_scale))
    for proto in ("http", "zmq"):
        assert r.figure(f"{proto} accepted") + r.figure(f"{proto} refused busy") == 40 * rounds
        assert r.figure(f"{proto} refused busy") > 0
        assert r.figure(f"{proto} connection resets") == 0
