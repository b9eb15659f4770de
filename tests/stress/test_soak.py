"""A soak of short requests of every kind on two models at once (HTTP and ZeroMQ streams, cancels,
disconnects, JSON-schema grammars, embeddings): after the warm-up the server's resident memory
grows under 10% and its fds, threads and shm segments not at all; every KV block is free at the
end. CI runs 400 requests; TANDEM_STRESS_SCALE=25 (or `tandem stress`) runs 10,000."""

from __future__ import annotations

from tandem.stress import soak


def test_soak_leaves_the_server_as_it_was(stress_scale: float) -> None:
    r = soak.run(stress_scale)
    assert r.passed, r.failures
    assert r.figure("requests") == max(256, round(soak.BASE_REQUESTS * stress_scale))
    for kind, _ in soak.KINDS:
        assert r.figure(f"{kind} requests") > 0, kind
    assert r.figure("failed requests") == 0
    assert r.figure("grammar replies complete and valid") > 0
    assert r.figure("shm segment growth") <= 0
    for model in soak.MODELS:
        assert r.figure(f"{model} KV blocks used at the end") == 0
        assert r.figure(f"{model} worker RSS growth") < 10
        assert r.figure(f"{model} scheduler RSS growth") < 10
    assert r.figure("gateway RSS growth") < 10
