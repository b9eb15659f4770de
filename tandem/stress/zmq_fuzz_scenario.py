"""Scenario 12 for `tandem stress`: the seeded ZeroMQ fuzzer (zmq_fuzz) against a real serve.

The CI-bounded test (tests/stress/test_zmq_fuzz.py) adds hypothesis frames and a concurrent
well-behaved client; here the long run counts outcomes and checks the server survived them all.
"""

from __future__ import annotations

import time

from tandem.stress.result import ScenarioResult
from tandem.stress.server import stress_server
from tandem.stress.zmq_fuzz import fuzz_zmq

CASES = 2000  # at scale 1, the bounded run
SEED = 20261201


def run(scale: float = 1.0, seed: int = SEED) -> ScenarioResult:
    result = ScenarioResult("zmq_fuzz")
    t0 = time.monotonic()
    with stress_server() as server:
        report = fuzz_zmq(server.zmq_url, max(1, round(CASES * scale)), seed)
        alive = server.alive()
        log = server.log_text()
    for name in ("cases", "frames", "error_replies", "accepted", "dropped_peers"):
        result.add(name, getattr(report, name))
    for name in ("internal_errors", "unexpected_replies", "duplicate_terminals", "unanswered", "silent"):
        result.add(name, getattr(report, name))
    result.check(report.ok, f"the server mishandled fuzz cases: {report.failures[:3]}")
    result.check(alive, "the server died under fuzzing")
    result.check("Traceback" not in log, "the server logged a traceback")
    result.seconds = time.monotonic() - t0
    return result
