"""The worker dies (SIGKILL), fails inside a step (an injected exception, an exit), or hangs
(SIGSTOP), with streams in flight over HTTP and ZeroMQ, plain, grammar-constrained and
embedding requests, and several models loaded: every accepted request gets exactly one terminal
frame, streams that had output end with an error naming the cause within seconds, requests that
had none are replayed with the output an undisturbed run gives, the worker comes back, and
`serve` gives up (non-zero, naming the model) after 3 deaths in a minute.

`pytest -s` prints the figures a reliability report quotes (lines starting RELIABILITY)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fault_kit import (
    Footprint,
    Recorded,
    exit_reason,
    fault_server,
    generate,
    models_home,
    ollama_stream,
    openai_stream,
    report,
    worker_pids,
    zmq_stream,
)
from live_server import LONG, Server, wait_for
from procs import running

LONG_STRING = {"type": "string", "minLength": 2000}  # a constrained reply that runs for seconds
SHORT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}
ERROR_WITHIN_S = 5.0
# Variants that repeat a path another test takes: TANDEM_STRESS_SCALE > 1 runs them too.
LONGER_RUN_ONLY = pytest.mark.skipif(
    float(os.environ.get("TANDEM_STRESS_SCALE", "1")) <= 1, reason="runs at TANDEM_STRESS_SCALE > 1"
)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    return models_home(tmp_path_factory, tiny_bert)


def eight_streams(server: Server, prompt: str = "once upon") -> list[Recorded]:
    """Eight long streams on `tiny`: four over HTTP (ollama, ollama with a JSON schema, OpenAI
    chat), four over ZeroMQ (one grammar-constrained)."""
    zmq_url = server.ps()["zmq"][0]
    gen = {"model": "tiny", "prompt": prompt, "raw": True, "options": LONG}
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    return [
        ollama_stream(server, "http-generate-1", gen),
        ollama_stream(server, "http-generate-2", {**gen, "prompt": prompt + " a time"}),
        ollama_stream(server, "http-format", {**gen, "format": LONG_STRING}),
        openai_stream(server, "http-openai-chat", chat),
        zmq_stream(zmq_url, "zmq-1", prompt, raw=True, ignore_eos=True),
        zmq_stream(zmq_url, "zmq-2", prompt + " there", raw=True, ignore_eos=True),
        zmq_stream(zmq_url, "zmq-3", prompt + " was", raw=True, ignore_eos=True),
        zmq_stream(
            zmq_url,
            "zmq-grammar",
            prompt,
            raw=True,
            grammar_kind="json_schema",
            grammar=json.dumps(LONG_STRING),
        ),
    ]


def embed(server: Server, texts: list[str]) -> np.ndarray:
    r = httpx.post(server.url + "/api/embed", json={"model": "bert", "input": texts}, timeout=120)
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"])


def structured(server: Server, prompt: str) -> str:
    body = {
        "model": "tiny",
        "prompt": prompt,
        "raw": True,
        "stream": False,
        "format": SHORT_SCHEMA,
        "options": {"num_predict": 60, "temperature": 0},
    }
    r = httpx.post(server.url + "/api/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["response"]


def health_codes_until_ok(server: Server, restarts: int = 1, timeout: float = 60) -> tuple[set[int], float]:
    """/health's statuses from now until it is ok on the restarted worker, and how long that took.
    While the scheduler replaces the worker /health is 503, or (a restart shorter than its 2 s
    stats timeout) waits for the new worker: never ok with the old one gone."""
    seen: set[int] = set()
    t0 = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while time.monotonic() - t0 < timeout:
            try:
                r = c.get("/health")
            except httpx.HTTPError:
                seen.add(0)
                continue
            seen.add(r.status_code)
            # ok from the new worker; a 200 from before the scheduler saw the death does not count
            if r.status_code == 200 and r.json()["worker_restarts"] >= restarts:
                return seen, time.monotonic() - t0
            time.sleep(0.05)
    pytest.fail(f"/health did not come back within {timeout} s: {seen}")


def log_count(server: Server, text: str) -> int:
    return server.log.read_text().count(text)


def test_sigkill_with_streams_in_flight_over_http_and_zmq(home: Path, stress_scale: float) -> None:
    server = fault_server(home, "--max-num-seqs", "8").start()
    foot = None
    try:
        # Undisturbed references, and the other models loaded: tiny2 (a llama) and bert (embeddings).
        plain_ref = generate(server, "the queued one", 12)
        json_ref = structured(server, "the queued json")
        texts = [f"embedding input {i} " * 20 for i in range(16)]
        vec_ref = embed(server, texts)
        assert generate(server, "warm", 2, model="tiny2")
        foot = Footprint(server)
        for _ in range(max(1, round(stress_scale))):
            streams = eight_streams(server)
            for s in streams:
                assert s.first_output.wait(60), f"{s.label} produced nothing: {s.error}"
            other = ollama_stream(
                server,
                "tiny2",
                {"model": "tiny2", "prompt": "x", "options": {"num_predict": 400, "ignore_eos": True}},
            )
            # Two more wait behind the eight (--max-num-seqs 8): they have sent nothing when the
            # worker dies, so they must run on the next one as if nothing had happened.
            queued: dict[str, str] = {}

            def queue(key: str, ask: Callable[[], str], queued: dict[str, str] = queued) -> None:
                queued[key] = ask()

            waiters = [
                threading.Thread(
                    target=queue, args=("plain", lambda: generate(server, "the queued one", 12))
                ),
                threading.Thread(target=queue, args=("json", lambda: structured(server, "the queued json"))),
            ]
            for t in waiters:
                t.start()
            wait_for(lambda: server.ps()["waiting"] >= 2, timeout=20)
            # Embeddings in flight on the bert model, which loses its worker too.
            vectors: list[np.ndarray] = []
            stop = threading.Event()

            def embed_loop(vectors: list[np.ndarray] = vectors, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    vectors.append(embed(server, texts))

            embedders = [threading.Thread(target=embed_loop) for _ in range(2)]
            for t in embedders:
                t.start()
            time.sleep(0.2)
            pids = worker_pids(server)
            t0 = time.monotonic()
            os.kill(pids["tiny"], signal.SIGKILL)
            os.kill(pids["bert"], signal.SIGKILL)
            codes, restart_s = health_codes_until_ok(server)
            stop.set()
            for s in streams:
                s.join()
                s.check_one_terminal()
                assert s.error and ("SIGKILL" in s.error), (s.label, s.error)
                assert s.ended_at - t0 < ERROR_WITHIN_S, (s.label, s.ended_at - t0)
            for t in [*waiters, *embedders]:
                t.join(60)
                assert not t.is_alive()
            assert queued == {"plain": plain_ref, "json": json_ref}
            assert len(vectors) >= 2
            for v in vectors:
                np.testing.assert_allclose(v, vec_ref, atol=1e-5)
            other.join().check_one_terminal()
            assert not other.error and other.completion_tokens == 400, other.error  # tiny2 never noticed
            new = worker_pids(server)
            assert (
                new["tiny"] != pids["tiny"] and new["bert"] != pids["bert"] and new["tiny2"] == pids["tiny2"]
            )
            assert not running(pids["tiny"]) and not running(pids["bert"])
            report(
                "worker SIGKILL, 8 streams (4 HTTP + 4 ZeroMQ)",
                error_frames_after_s=f"{max(s.ended_at for s in streams) - t0:.2f}",
                health_ok_after_s=f"{restart_s:.2f}",
                health_codes_meanwhile=sorted(codes),
                replayed=log_count(server, "replaying"),
                embed_requests_answered=len(vectors) * 2,
            )
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    assert foot is not None
    foot.wait_gone()


LONG_PROMPT = " ".join(f"w{i % 50}" for i in range(700))  # about 2700 tokens: hundreds of prefill steps
FAULT_STEP = 150
REPLAYED_OPTIONS = {"num_predict": 6, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize(
    "kind",
    # exit@N takes a SIGKILL's path, told by its exit code: the longer run only
    ["raise", pytest.param("exit", marks=LONGER_RUN_ONLY)],
)
def test_worker_fails_inside_a_step(home: Path, kind: str) -> None:
    """``raise@N``: the forward of step N raises; the worker reports the exception (ActorFailed)
    and exits. ``exit@N``: it exits with code 3 without a word. Streams with output fail naming
    the cause; a request still in its (chunked) prefill has sent nothing and is replayed."""
    server = fault_server(
        home, "--max-num-batched-tokens", "8", "--inject-fault", f"{kind}@{FAULT_STEP}"
    ).start()
    foot = Footprint(server)
    try:
        zmq_url = server.ps()["zmq"][0]
        gen = {"model": "tiny", "prompt": "hi", "raw": True, "options": LONG}
        streams = [
            ollama_stream(server, "http", gen),
            ollama_stream(server, "http-format", {**gen, "format": LONG_STRING}),
            zmq_stream(zmq_url, "zmq", "hi", raw=True, ignore_eos=True),
        ]
        for s in streams:
            assert s.first_output.wait(60), s.error
        # Its prefill takes ~350 steps of 8 tokens: step FAULT_STEP falls inside it.
        replayed = ollama_stream(
            server,
            "prefilling",
            {
                "model": "tiny",
                "prompt": LONG_PROMPT,
                "raw": True,
                "options": {"num_predict": 6, "temperature": 0, "ignore_eos": True},
            },
        )
        for s in streams:
            s.join()
            s.check_one_terminal()
        expected = "InjectedFault" if kind == "raise" else "exited with code 3"
        for s in streams:
            assert expected in s.error, (s.label, s.error)
        replayed.join(120).check_one_terminal()
        assert not replayed.error and replayed.completion_tokens == 6, replayed.error
        # The same request on an undisturbed worker gives the same tokens.
        assert generate(server, LONG_PROMPT, 6) == replayed.text
        assert log_count(server, "replaying") >= 1
        assert httpx.get(server.url + "/health", timeout=10).json()["worker_restarts"] == 1
        report(f"worker {kind}@N inside forward", replayed=log_count(server, "replaying"))
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    foot.wait_gone()


def test_sigstopped_worker_is_caught_by_the_watchdog(home: Path) -> None:
    """SIGSTOP freezes compute and heartbeats alike: the step watchdog (--step-timeout 2) takes it
    for a hang, kills and replaces it; SIGCONT afterwards wakes nothing and adds no frame."""
    server = fault_server(home, "--step-timeout", "2").start()
    foot = Footprint(server)
    try:
        zmq_url = server.ps()["zmq"][0]
        gen = {"model": "tiny", "prompt": "hi", "raw": True, "options": LONG}
        streams = [
            ollama_stream(server, "http", gen),
            ollama_stream(server, "http-format", {**gen, "format": LONG_STRING}),
            zmq_stream(zmq_url, "zmq", "hi", raw=True, ignore_eos=True),
        ]
        for s in streams:
            assert s.first_output.wait(60), s.error
        pid = server.worker_pid()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            for s in streams:
                s.join(30)
        finally:
            caught_s = max(s.ended_at for s in streams) - t0
            try:
                os.kill(pid, signal.SIGCONT)
                still_there = running(pid)
            except ProcessLookupError:
                still_there = False
        assert not still_there, "the stopped worker was not killed"
        time.sleep(1.0)  # anything the woken process could still send would arrive now
        for s in streams:
            s.check_one_terminal()
            assert "no progress" in s.error or "heartbeat" in s.error, (s.label, s.error)
        assert caught_s < 2 + 3 + ERROR_WITHIN_S, caught_s  # timeout, plus 3x a step and slack
        _, restart_s = health_codes_until_ok(server)
        assert generate(server, "after", 3)
        report(
            "worker SIGSTOP (--step-timeout 2)",
            error_frames_after_s=f"{caught_s:.2f}",
            health_ok_after_s=f"{restart_s:.2f}",
        )
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    foot.wait_gone()


@pytest.fixture
def two_model_server(home: Path) -> Iterator[Server]:
    server = fault_server(home).start()
    try:
        assert generate(server, "warm", 2, model="tiny2")
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(
    "victim",
    # the --model model's engine giving up is also covered by tests/pipeline: the longer run only
    [pytest.param("tiny", marks=LONGER_RUN_ONLY), "tiny2"],
)
def test_three_deaths_in_a_minute_stop_serve(two_model_server: Server, victim: str) -> None:
    """Deaths count per model: the third of one model's worker within 60 s makes `serve` exit
    non-zero with the reason, naming the model, whether it is the --model one or one loaded on
    demand."""
    server = two_model_server
    foot = Footprint(server)
    assert server.proc is not None
    killed: set[int] = set()

    def next_worker() -> int | None:
        # While its scheduler restarts a worker /api/ps may show the first one's pid: only a live
        # pid not killed yet is the new worker.
        pid = worker_pids(server).get(victim)
        return pid if pid is not None and pid not in killed and running(pid) else None

    t0 = time.monotonic()
    for _ in range(3):
        wait_for(next_worker, timeout=60, step=0.1)
        pid = next_worker()
        assert pid is not None
        killed.add(pid)
        os.kill(pid, signal.SIGKILL)
    code = server.proc.wait(60)
    exit_s = time.monotonic() - t0
    log = server.log.read_text()
    assert code != 0, log[-3000:]
    last = exit_reason(server)
    assert "3 times" in last and f"'{victim}:latest'" in last, last
    report(f"3 worker deaths in a minute ({victim})", serve_exit_code=code, exit_after_s=f"{exit_s:.2f}")
    foot.wait_gone()
