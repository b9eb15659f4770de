"""The server's own processes fail, or it is started twice, stopped, or short of memory:

- the gateway or the scheduler is SIGKILLed: the processes below it exit on their own within 5 s,
  and the next `serve` removes the dead one's shm segments and ipc socket files;
- a second `serve` on the same port or runtime directory refuses in one line, non-zero, and the
  first keeps serving;
- SIGTERM with requests in flight: new requests get 503, running ones drain up to
  --drain-timeout and then end with an error, exit 0, nothing left behind;
- a model or KV pool bigger than the memory there is, or a ring bigger than /dev/shm's free
  space: one line naming it before any work, non-zero.

`pytest -s` prints the figures a reliability report quotes (lines starting RELIABILITY)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fault_kit import (
    Footprint,
    exit_reason,
    fault_server,
    generate,
    models_home,
    ollama_stream,
    report,
    worker_pids,
    zmq_stream,
)
from live_server import LONG, free_port, wait_for
from procs import descendants, running

EXIT_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models_home(tmp_path_factory)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.parametrize("victim", ["gateway", "scheduler"])
def test_sigkill_of_gateway_or_scheduler(home: Path, victim: str) -> None:
    server = fault_server(home).start()
    assert server.proc is not None
    assert generate(server, "warm", 2, model="tiny2")  # two models: two schedulers, two workers
    foot = Footprint(server)
    shm, ipc = foot.shm(), foot.ipc()
    assert shm and ipc
    streams = [ollama_stream(server, "http", {"model": "tiny", "prompt": "x", "options": LONG})]
    streams.append(zmq_stream(server.ps()["zmq"][0], "zmq", "x", ignore_eos=True))
    for s in streams:
        assert s.first_output.wait(60)
    if victim == "gateway":
        below = descendants(server.proc.pid)
        os.kill(server.proc.pid, signal.SIGKILL)
    else:
        target = _ppid(worker_pids(server)["tiny"])  # tiny's scheduler
        below = descendants(target) | {target}
        os.kill(target, signal.SIGKILL)
    gone_s = wait_for(lambda: not any(running(p) for p in below), timeout=EXIT_WITHIN_S + 5, step=0.05)
    assert gone_s < EXIT_WITHIN_S, gone_s
    for s in streams:  # a killed gateway answers nothing more; a killed scheduler's streams fail
        s.join(30)
        assert s.terminals <= 1 and s.after_terminal == 0
        if victim == "scheduler":
            s.check_one_terminal()
            assert s.error, s.label
    code = server.proc.wait(30)
    if victim == "scheduler":  # the gateway gives up on a dead engine: non-zero, with the reason
        assert code != 0
        reason = exit_reason(server)
        assert "scheduler was killed by SIGKILL" in reason and "'tiny:latest'" in reason, reason
    wait_for(lambda: not any(running(p) for p in foot.pids), timeout=15)
    stale = foot.shm() | foot.ipc()
    if victim == "gateway":  # nobody was left to clean up after the gateway: the next serve does
        assert stale
    nxt = fault_server(home).start()
    try:
        assert not [p for p in stale if p.exists()], "the dead server's shm or ipc files survived"
        assert generate(nxt, "after", 3)
    finally:
        assert nxt.stop() == 0
    report(f"{victim} SIGKILL", children_gone_after_s=f"{gone_s:.2f}", stale_removed=len(stale))


def _serve(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TANDEM_HOME": str(home), "XDG_RUNTIME_DIR": str(home / "xdg")}
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", "tiny", "--kv-cache-memory", "16M", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_second_serve_on_the_same_port_or_runtime_directory_refuses(home: Path) -> None:
    first = fault_server(home).start()
    assert first.proc is not None
    try:
        stream = ollama_stream(
            first, "first", {"model": "tiny", "prompt": "x", "options": {"num_predict": 300}}
        )
        sockets = first.ps()["zmq"]
        for args, expected in (
            (("--port", str(first.port)), f"port {first.port} is in use"),
            (("--port", str(free_port())), "another tandem serve"),
        ):
            before = Footprint(first).ipc()
            done = _serve(first.home, *args)
            assert done.returncode != 0
            err = done.stderr.strip().splitlines()
            assert len(err) == 1 and expected in err[0], done.stderr
            assert Footprint(first).ipc() == before, "the second serve left files in the runtime dir"
        stream.join(60).check_one_terminal()
        assert not stream.error
        assert first.ps()["zmq"] == sockets and all(Path(s.removeprefix("ipc://")).exists() for s in sockets)
        assert generate(first, "still", 3)
        from tandem.client import TandemClient

        with TandemClient(sockets[0], timeout=30) as c:
            assert c.generate("x", max_tokens=2, ignore_eos=True).finish_reason == "length"
        assert str(first.proc.pid) in (first.home / "run" / "server.json").read_text()
    finally:
        assert first.stop() == 0


def test_sigterm_drains_then_ends_what_is_left(home: Path) -> None:
    server = fault_server(home, "--drain-timeout", "2").start()
    assert server.proc is not None
    assert generate(server, "warm", 2, model="tiny2")
    foot = Footprint(server)
    zmq_url = server.ps()["zmq"][0]
    gen = {"model": "tiny", "prompt": "x", "options": LONG}
    streams = [
        ollama_stream(server, "long", gen),
        ollama_stream(server, "long-tiny2", {**gen, "model": "tiny2"}),
        ollama_stream(server, "long-format", {**gen, "format": {"type": "string", "minLength": 2000}}),
        zmq_stream(zmq_url, "zmq-long", "x", ignore_eos=True),
        # ignore_eos: a random model may sample its end token before the 40th
        ollama_stream(server, "short", {**gen, "options": {"num_predict": 40, "ignore_eos": True}}),
    ]
    for s in streams:
        assert s.first_output.wait(60)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x"}, timeout=10)
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"], refused.text
    oai = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert oai.status_code == 503 and oai.json()["error"]["type"] == "server_error", oai.text
    from tandem.client import ShuttingDownError, TandemClient

    with TandemClient(zmq_url, timeout=10) as c, pytest.raises(ShuttingDownError):
        c.generate("x", max_tokens=2)
    code = server.proc.wait(60)
    exit_s = time.monotonic() - t0
    assert code == 0, server.log.read_text()[-3000:]
    for s in streams:
        s.join(30).check_one_terminal()
    short = streams[-1]
    assert not short.error and short.completion_tokens == 40  # finished within the drain
    for s in streams[:-1]:
        assert "shutting down" in s.error, (s.label, s.error)
        assert s.ended_at - t0 >= 2.0  # it had its drain time
    assert exit_s < 2 + 10, exit_s
    foot.wait_gone()
    server.stop()
    report("SIGTERM with --drain-timeout 2", exit_code=code, exit_after_s=f"{exit_s:.2f}")


def test_out_of_memory_at_load_is_one_line_before_any_work(home: Path, tmp_path: Path) -> None:
    checks = [
        # a KV pool bigger than the machine has
        (("--kv-cache-memory", "100000G"), "kv"),
        # a shm ring bigger than /dev/shm's free space
        (("--max-num-batched-tokens", str(_tokens_filling_shm())), "/dev/shm"),
    ]
    for args, expected in checks:
        t0 = time.monotonic()
        done = _serve(home, "--port", str(free_port()), *args)
        took = time.monotonic() - t0
        assert done.returncode != 0
        err = [line for line in done.stderr.strip().splitlines() if line.strip()]
        assert expected.lower() in err[-1].lower(), done.stderr[-3000:]
        assert err[-1].startswith("Error: "), done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        report(f"out of memory at load ({args[0]})", exit_code=done.returncode, refused_after_s=f"{took:.2f}")
    # a --model bigger than --memory-limit refuses at once; one loaded on demand past it is a
    # 503 naming the sizes, and serve goes on
    one = _one_size(home)
    done = _serve(home, "--port", str(free_port()), "--memory-limit", str(one // 2))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("Error: cannot load model 'tiny"), done.stderr[-2000:]
    assert "--memory-limit" in last, done.stderr[-2000:]
    server = fault_server(home, "--kv-cache-memory", "16M", "--memory-limit", str(one + one // 2)).start()
    try:
        r = httpx.post(server.url + "/api/generate", json={"model": "tiny2", "prompt": "x"}, timeout=60)
        assert r.status_code == 503 and "bytes" in r.json()["error"], r.text
        assert generate(server, "x", 2)
    finally:
        assert server.stop() == 0


def _one_size(home: Path) -> int:
    """What one tiny model plans for (weights and the 16M KV cache _serve gives it)."""
    from tandem.gateway.http.model_pool import estimate_bytes
    from tandem.store.model_store import ensure_model
    from tandem.stress.server import home_env

    with home_env(home):
        return estimate_bytes(str(ensure_model("tiny", progress=False).path), 16 * 2**20)


def _tokens_filling_shm() -> int:
    """A --max-num-batched-tokens whose ring needs more than /dev/shm has free."""
    from tandem.shm import batch_layout

    free = shutil.disk_usage("/dev/shm").free
    tokens = 1 << 16
    while batch_layout(tokens, 256, 64, 2).total_size <= 4 * free:  # far past: refused before allocating
        tokens *= 2
    return tokens
