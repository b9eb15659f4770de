"""What the fault tests share: streams that record every frame they get (HTTP and ZeroMQ), a
server whose ipc directories a test can see, and the check that nothing outlived it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from live_server import Server
from procs import descendants, running

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}


def run_dir(home: Path) -> Path:
    d = home / "xdg"
    d.mkdir(exist_ok=True)
    d.chmod(0o700)
    return d


def fault_server(home: Path, *args: str, model: str | None = "tiny") -> Server:
    """A server (not started) whose ipc directories lie under ``home/xdg``, where a test can see them."""
    server = Server(home, model=model, args=args)
    server.env["XDG_RUNTIME_DIR"] = str(run_dir(home))
    return server


@dataclass
class Recorded:
    """One request's frames as its client saw them; ``terminals`` must end up exactly 1."""

    label: str
    tokens: int = 0  # output frames before the terminal one
    text: str = ""
    terminals: int = 0
    error: str = ""  # the error frame's message, when it ended with one
    status: int = 0
    after_terminal: int = 0  # frames after the terminal one (must stay 0)
    completion_tokens: int = 0  # what the done frame counted
    first_output: threading.Event = field(default_factory=threading.Event)
    ended_at: float = 0.0
    thread: threading.Thread | None = None

    def end(self, error: str = "") -> None:
        if self.terminals:
            self.after_terminal += 1
            return
        self.terminals += 1
        self.error = error
        self.ended_at = time.monotonic()

    def output(self, text: str) -> None:
        if self.terminals:
            self.after_terminal += 1
            return
        self.tokens += 1
        self.text += text
        self.first_output.set()

    def join(self, timeout: float = 60) -> Recorded:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.label}: its client is still waiting"
        return self

    def check_one_terminal(self) -> None:
        assert self.terminals == 1 and self.after_terminal == 0, (
            f"{self.label}: {self.terminals} terminal frames, {self.after_terminal} frames after it"
        )


def _start(rec: Recorded, target: object) -> Recorded:
    rec.thread = threading.Thread(target=target, name=rec.label, daemon=True)  # type: ignore[arg-type]
    rec.thread.start()
    return rec


def ollama_stream(server: Server, label: str, body: dict, path: str = "/api/generate") -> Recorded:
    """An ollama NDJSON stream: content lines, then one `done` line or one `error` line."""
    rec = Recorded(label)

    def run() -> None:
        try:
            with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.end(r.read().decode())
                    return
                for line in r.iter_lines():
                    if not line:
                        continue
                    obj = json.loads(line)
                    if "error" in obj:
                        rec.end(obj["error"])
                    elif obj.get("done"):
                        rec.completion_tokens = obj.get("eval_count", 0)
                        rec.end()
                    else:
                        rec.output(obj.get("response") or obj.get("message", {}).get("content", ""))
        except httpx.HTTPError as e:
            rec.end(f"transport: {e!r}")

    return _start(rec, run)


def openai_stream(server: Server, label: str, body: dict) -> Recorded:
    """An OpenAI SSE stream: chunks, then `[DONE]` (after a finish_reason) or one error event."""
    rec = Recorded(label)

    def run() -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.end(r.read().decode())
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        rec.end()
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.end(obj["error"]["message"])
                    elif obj["choices"] and obj["choices"][0]["delta"].get("content"):
                        rec.output(obj["choices"][0]["delta"]["content"])
        except httpx.HTTPError as e:
            rec.end(f"transport: {e!r}")

    return _start(rec, run)


def zmq_stream(url: str, label: str, prompt: str, max_tokens: int = 3000, **kw: object) -> Recorded:
    """A stream over the ZeroMQ protocol (tandem.client): deltas, then Finished or one error."""
    from tandem.client import TandemClient, TandemError

    rec = Recorded(label)

    def run() -> None:
        with TandemClient(url, timeout=120) as c:
            try:
                with c.stream(prompt, max_tokens=max_tokens, **kw) as s:  # type: ignore[arg-type]
                    for delta in s:
                        rec.output(delta.text)
                    rec.end()
            except TandemError as e:
                rec.end(f"{e.code}: {e}")

    return _start(rec, run)


def generate(server: Server, prompt: str, n: int, model: str = "tiny", **options: object) -> str:
    body = {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "stream": False,
        "options": {"num_predict": n, "ignore_eos": True, "temperature": 0, **options},
    }
    r = httpx.post(server.url + "/api/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["response"]


class Footprint:
    """What a running server put on the machine: its processes, shm segments and ipc files."""

    def __init__(self, server: Server) -> None:
        assert server.proc is not None
        self.pids = {server.proc.pid} | descendants(server.proc.pid)
        self.home = server.home

    def shm(self) -> set[Path]:
        return {p for p in Path("/dev/shm").glob("tandem-*") if _owner(p) in self.pids}

    def ipc(self) -> set[Path]:
        return set(run_dir(self.home).rglob("*"))

    def left(self) -> dict[str, object]:
        return {
            "processes": sorted(p for p in self.pids if running(p)),
            "shm": sorted(map(str, self.shm())),
            "ipc": sorted(map(str, self.ipc())),
        }

    def wait_gone(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self.left().values()):
            time.sleep(0.05)
        assert not any(self.left().values()), f"left behind: {self.left()}"


def _owner(segment: Path) -> int:
    try:
        return int(segment.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def report(name: str, **figures: object) -> None:
    """A figure a reliability report quotes, in the test's output (`pytest -s` shows it)."""
    print(f"\nRELIABILITY {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def models_home(factory: object, tiny_bert: Path | None = None) -> Path:
    """A TANDEM_HOME holding `tiny` and `tiny2` (two tiny llamas, different weights) and, given
    its folder, the tiny BERT as `bert`."""
    from live_server import TINY_CONTEXT, register

    from tandem.formats.tiny import TinySpec, write_tiny_gguf

    home = factory.mktemp("faults")  # type: ignore[attr-defined]
    models = factory.mktemp("fault-models")  # type: ignore[attr-defined]
    for seed, name in enumerate(("tiny", "tiny2")):
        path = write_tiny_gguf(models / f"{name}.gguf", TinySpec(context=TINY_CONTEXT, seed=seed + 1))
        register(home, path, name)
    if tiny_bert is not None:
        register(home, tiny_bert, "bert")
    return home


def exit_reason(server: Server) -> str:
    """The one line `serve` exits with when it gives up ("Error: ..."; warnings may follow it)."""
    lines = [line for line in server.log.read_text().splitlines() if line.startswith("Error: ")]
    assert lines, server.log.read_text()[-3000:]
    return lines[-1]


def worker_pids(server: Server) -> dict[str, int]:
    models = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
    return {m["name"].split(":")[0]: int(m["tandem"]["memory_plan"]["worker_pid"]) for m in models}
