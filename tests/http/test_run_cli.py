"""`tandem run` in a pseudo-terminal (pexpect), and `tandem ps` / `tandem stop`, against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from live_server import Server, free_port, tiny_home, wait_for

PROMPT = ">>> "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    s = Server(tiny_home(tmp_path_factory, tiny_gguf)).start()
    yield s
    s.stop()  # normally `tandem stop` has stopped it already


def tandem(server: Server, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", *args],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_run(server: Server, *args: str) -> pexpect.spawn:
    env = {**server.env, "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "tandem.cli", "run", *args],
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    return child


def prompt_tokens(child: pexpect.spawn, text: str) -> int:
    child.sendline(text)
    child.expect(r"prompt eval count:\s+(\d+) token")
    n = int(child.match.group(1))
    child.expect_exact(PROMPT)
    return n


def test_chat_keeps_history_until_clear(server: Server) -> None:
    child = spawn_run(server, "--verbose")
    child.sendline("/set parameter num_predict 4")
    child.expect_exact("Set parameter 'num_predict' to '4'")
    child.expect_exact(PROMPT)
    first = prompt_tokens(child, "hello")
    second = prompt_tokens(child, "hello")
    assert second > 2 * first - 5  # the first exchange was sent again with the second
    child.sendline("/clear")
    child.expect_exact("Cleared session context")
    child.expect_exact(PROMPT)
    assert prompt_tokens(child, "hello") == first
    child.sendline("/set system Be brief.")
    child.expect_exact("Set system message.")
    child.expect_exact(PROMPT)
    assert prompt_tokens(child, "hello") > first
    child.sendline("/show info")
    child.expect(r"architecture\s+llama")
    child.expect_exact(PROMPT)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_streams_and_ctrl_c_cancels_the_answer(server: Server) -> None:
    child = spawn_run(server, "tiny")
    child.sendline("/set parameter num_predict 3000")
    child.expect_exact(PROMPT)
    child.sendline("/set parameter ignore_eos true")
    child.expect_exact(PROMPT)
    child.sendline("tell me everything")
    child.expect(r"\S{10}")  # text is arriving while the answer runs
    assert server.ps()["running"] == 1
    child.sendintr()
    child.expect_exact(PROMPT)
    wait_for(lambda: server.ps()["running"] == 0, timeout=1.0)  # leaving the stream cancelled it
    child.sendcontrol("d")  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_unknown_command_and_model(server: Server) -> None:
    child = spawn_run(server)
    child.sendline("/frobnicate")
    child.expect_exact("Unknown command '/frobnicate'")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    r = tandem(server, "run", "ghost")
    assert r.returncode == 1 and "model 'ghost' not found" in r.stderr


def test_run_without_a_server_says_how_to_start_one(server: Server) -> None:
    r = tandem(server, "run", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "tandem serve" in r.stderr


def test_ps_then_stop(server: Server) -> None:
    r = tandem(server, "ps")
    assert r.returncode == 0, r.stderr
    assert re.search(r"tiny:latest\s+\S+ \S+\s+100% CPU\s+4096", r.stdout), r.stdout
    assert "KV BLOCKS" in r.stdout and "worker alive" in r.stdout
    r = tandem(server, "stop")
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert server.proc is not None and server.proc.wait(5) == 0  # drained and exited cleanly
    assert not (server.home / "run" / "server.json").exists()
    r = tandem(server, "stop")
    assert r.returncode == 1 and "no tandem server is running" in r.stderr
    r = tandem(server, "ps")
    assert r.returncode == 1 and "tandem serve" in r.stderr
