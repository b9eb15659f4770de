"""ZeroMQ protocol fuzzing against a real `tandem serve --zmq-port 0` on the tiny model.

The seeded fuzzer (tandem/stress/zmq_fuzz.py) sends 2,000 cases in the CI-bounded run (times
`stress_scale`; `tandem stress` runs 10,000 and more): random bytes, truncated msgpack, wrong frame
counts, deep nesting, huge array/map/str headers, frames over the size limit, a wrong type in each
field of each client message, unknown tags, invalid UTF-8. Hypothesis then draws frames of its own.
Meanwhile a well-behaved client keeps generating greedily and must get its solo outputs, token for
token; the server must answer every case (or drop the peer of an oversized frame), never with an
`internal` error, stay alive and keep its memory bounded.

Run: python -m pytest tests/stress/test_zmq_fuzz.py -q      (TANDEM_STRESS_SCALE=5 for 10,000 cases)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import Server, register
from procs import descendants

from tandem.client import TandemClient
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.messages import GenerateRequest, HealthRequest
from tandem.stress.zmq_fuzz import BadStr, Raw, ZmqFuzzer, ZmqFuzzReport, fuzz_zmq, pack

CI_CASES = 2000
PROMPTS = ["The sky is", "Once upon a time", "1, 2, 3,"]
RSS_GROWTH_LIMIT = 150 * 2**20  # per process; the fuzz run itself must not grow a process by this


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", TinySpec(context=4096))
    home = tmp_path_factory.mktemp("home")
    register(home, model, "tiny")
    srv = Server(home, args=("--zmq-port", "0")).start()
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


def endpoints(server: Server) -> list[str]:
    return json.loads((server.home / "run" / "server.json").read_text())["zmq"]


class WellBehaved(threading.Thread):
    """Greedy generations over tcp while the fuzzer runs: each must equal its solo run."""

    def __init__(self, url: str, solo: dict[str, list[int]]) -> None:
        super().__init__(name="well-behaved", daemon=True)
        self.url, self.solo = url, solo
        self.done, self.errors = 0, []  # type: ignore[var-annotated]
        self.halt = threading.Event()

    def run(self) -> None:
        with TandemClient(self.url, timeout=60) as c:
            while not self.halt.is_set():
                prompt = PROMPTS[self.done % len(PROMPTS)]
                try:
                    out = c.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
                    if out.token_ids != self.solo[prompt]:
                        self.errors.append(f"{prompt!r}: {out.token_ids} != solo {self.solo[prompt]}")
                    self.done += 1
                except Exception as e:  # every failure is reported by the test
                    self.errors.append(repr(e))


def solo_runs(url: str) -> dict[str, list[int]]:
    with TandemClient(url, timeout=60) as c:
        return {p: c.generate(p, max_tokens=12, temperature=0, ignore_eos=True).token_ids for p in PROMPTS}


def undecodable_metric(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("tandem_zmq_undecodable_frames_total")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def assert_clean(report: ZmqFuzzReport) -> None:
    assert report.ok, (report.failures, report)
    assert report.internal_errors == 0 and report.unexpected_replies == 0 and report.unanswered == 0


def test_seeded_fuzz_keeps_the_server_and_a_concurrent_client_well(server: Server, stress_scale: float):
    ipc, tcp = endpoints(server)
    solo = solo_runs(tcp)
    pids = {server.proc.pid} | descendants(server.proc.pid)
    before = {p: rss(p) for p in pids}
    well = WellBehaved(tcp, solo)
    well.start()
    cases = int(CI_CASES * stress_scale)
    before_metric = undecodable_metric(server)
    try:
        report = fuzz_zmq(ipc, cases, seed=20261201)
    finally:
        well.halt.set()
        well.join(60)
    print(f"zmq fuzz: {report}")  # the figures a reliability report quotes (pytest -s)
    assert report.cases == cases and report.error_replies > cases // 2
    assert report.kinds.get("oversized", 0) == report.dropped_peers
    assert_clean(report)
    assert well.errors == [] and well.done > 0, well.errors
    assert server.proc.poll() is None, server.log.read_text()[-3000:]
    assert undecodable_metric(server) - before_metric >= report.undecodable_replies
    for p in pids:
        grew = rss(p) - before[p]
        assert grew < RSS_GROWTH_LIMIT, f"pid {p} grew by {grew / 2**20:.0f} MiB during the fuzz run"
    assert solo_runs(tcp) == solo  # and the same answers once it is over


# -- hypothesis: frames drawn by shape, each one case of the fuzzer --------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(
        [BadStr(b"\xff"), BadStr(b"\xed\xa0\x80"), Raw(b"\xdd\xff\xff\xff\xff"), Raw(b"\xd4\x01\x02")]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3)
    ),
    max_leaves=12,
)
tags = st.sampled_from([50, 53, 54, 56]) | st.integers(-(2**63), 2**64 - 1) | scalars
frames = st.one_of(
    st.binary(max_size=64).map(lambda b: [b]),
    st.tuples(tags, st.lists(values, max_size=12)).map(lambda t: [pack([t[0], *t[1]])]),
    # a GenerateRequest with every field drawn: a readable id is owed a terminal under it
    st.tuples(st.text(min_size=1, max_size=6), st.lists(values, max_size=10)).map(
        lambda t: [pack([GenerateRequest.TAG, f"h-{t[0]}", *t[1]])]
    ),
    st.lists(st.binary(max_size=16), min_size=2, max_size=4),
    st.integers(1, 3000).map(lambda n: [pack([HealthRequest.TAG, Raw(b"\x91" * n + b"\xc0")])]),
)


def test_hypothesis_frames_are_each_answered(server: Server, stress_scale: float):
    fuzzer = ZmqFuzzer(endpoints(server)[0])

    @settings(
        max_examples=int(300 * stress_scale),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=frames)
    def check(case: list[bytes]) -> None:
        fuzzer.exchange(case)
        assert_clean(fuzzer.report)

    try:
        check()
        fuzzer.settle()
    finally:
        fuzzer.close()
    assert_clean(fuzzer.report)
    assert server.proc.poll() is None


def test_the_stress_command_runs_the_fuzzer_as_a_scenario() -> None:
    """`tandem stress` runs the same fuzzer against its own serve and reports the counts."""
    from tandem.stress import zmq_fuzz_scenario

    result = zmq_fuzz_scenario.run(scale=0.1)
    assert result.passed, result.failures
    assert result.figure("cases") == 200
    assert result.figure("internal_errors") == 0 and result.figure("error_replies") > 0
