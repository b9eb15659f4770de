"""Multi-model serving: one `tandem serve` loading pulled models on demand, each its own scheduler
and worker, unloading them on keep_alive, evicting idle ones under a memory cap, and leaving
nothing behind (processes, shm segments, ipc socket files) when a model goes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LONG, TINY_CONTEXT, Server, register, wait_for
from procs import descendants

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gateway.http.model_pool import estimate_bytes

KV = 16 * 2**20
NAMES = ("tiny", "tiny2", "tiny3")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("multi")
    models = tmp_path_factory.mktemp("multi-models")
    for seed, name in enumerate(NAMES):
        # Different seeds: different weights files (the store would share one blob otherwise).
        path = write_tiny_gguf(models / f"{name}.gguf", TinySpec(context=TINY_CONTEXT, seed=seed + 1))
        register(home, path, name)
    (home / "one_size").write_text(str(estimate_bytes(str(path), KV)))
    return home


def _server(home: Path, *args: str) -> Server:
    server = Server(home, args=("--kv-cache-memory", "16M", *args))
    server.env["XDG_RUNTIME_DIR"] = str(_run_dir(home))  # its ipc directories, where a test can see them
    return server.start()


def _sibling(home: Path) -> Path:
    """A TANDEM_HOME of its own (one serve runs per home) over the same model store, for a second
    server while the module's runs."""
    sib = Path(tempfile.mkdtemp(prefix="sib", dir=home.parent))  # short: ipc paths have a limit
    (sib / "models").symlink_to(home / "models")
    return sib


def _run_dir(home: Path) -> Path:
    d = home / "xdg"
    d.mkdir(exist_ok=True)
    d.chmod(0o700)
    return d


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    s = _server(home)
    yield s
    assert s.stop() == 0


def _one_size(home: Path) -> int:
    """The memory plan of one tiny model: its weights file and the KV budget (all three alike)."""
    return int((home / "one_size").read_text())


def loaded(server: Server) -> dict[str, dict]:
    models = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
    return {m["name"].split(":")[0]: m for m in models}


def generate(server: Server, model: str, **body: object) -> httpx.Response:
    payload = {
        "model": model,
        "prompt": "hello",
        "stream": False,
        "options": {"num_predict": 4, "ignore_eos": True},
    } | body
    return httpx.post(server.url + "/api/generate", json=payload, timeout=60)


class Footprint:
    """What a loaded model put on the machine: its processes, shm segments, ipc directory."""

    def __init__(self, server: Server) -> None:
        assert server.proc is not None
        self.server = server
        self.procs = descendants(server.proc.pid)
        # Segments are named tandem-{creator pid}-{hex}. Other tandem processes on this machine
        # (other test runs) make theirs too: only the server's tree's count, and any whose creator
        # is gone (a model's scheduler or worker that left one behind).
        self.shm = {p for p in Path("/dev/shm").glob("tandem-*") if _ours(p, {server.proc.pid} | self.procs)}
        self.ipc = set(_run_dir(server.home).glob("tandem-*"))

    def new_since(self, before: Footprint) -> tuple[set[int], set[Path], set[Path]]:
        return self.procs - before.procs, self.shm - before.shm, self.ipc - before.ipc


def _ours(segment: Path, pids: set[int]) -> bool:
    from procs import running

    try:
        owner = int(segment.name.split("-")[1])
    except (IndexError, ValueError):
        return False
    return owner in pids or not running(owner)


def assert_gone(server: Server, added: tuple[set[int], set[Path], set[Path]]) -> None:
    procs, shm, ipc = added
    assert procs, "the model started no processes of its own"
    assert ipc, "the model made no ipc directory of its own"
    assert shm, "the model made no shm segment of its own"
    from procs import running

    wait_for(lambda: not any(running(p) for p in procs), timeout=15)
    wait_for(lambda: not any(p.exists() for p in shm | ipc), timeout=15)


def test_a_request_to_each_model_loads_its_own_engine(server: Server) -> None:
    assert set(loaded(server)) == {"tiny"}
    for name in ("tiny", "tiny2"):
        r = generate(server, name)
        assert r.status_code == 200, r.text
        assert r.json()["done"] and r.json()["eval_count"] == 4
    ps = loaded(server)
    assert {"tiny", "tiny2"} <= set(ps)
    pids = {n: ps[n]["tandem"]["memory_plan"]["worker_pid"] for n in ("tiny", "tiny2")}
    assert pids["tiny"] != pids["tiny2"]
    for n in ("tiny", "tiny2"):
        assert ps[n]["size"] > 0 and ps[n]["size_vram"] == 0 and ps[n]["details"]["format"] == "gguf"
    assert ps["tiny"]["expires_at"].startswith("2318")  # the server's own model stays loaded
    assert not ps["tiny2"]["expires_at"].startswith("2318")
    ids = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"tiny:latest", "tiny2:latest", "tiny3:latest"} <= ids
    generate(server, "tiny2", prompt="", keep_alive=0)


def test_concurrent_streams_to_two_models_both_progress(server: Server) -> None:
    generate(server, "tiny2")  # loaded before the clock starts
    times: dict[str, list[float]] = {"tiny": [], "tiny2": []}
    counts: dict[str, int] = {}

    def stream(name: str) -> None:
        body = {"model": name, "prompt": "go", "options": {"num_predict": 300, "ignore_eos": True}}
        with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line and not json.loads(line)["done"]:
                    times[name].append(time.monotonic())
                elif line:
                    counts[name] = json.loads(line)["eval_count"]

    threads = [threading.Thread(target=stream, args=(n,)) for n in times]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    a, b = times["tiny"], times["tiny2"]
    assert counts == {"tiny": 300, "tiny2": 300}
    assert len(a) >= 100 and len(b) >= 100  # lines (a line can carry more than one token)
    # Both progressed at once: each got tokens while the other was still streaming.
    assert a[0] < b[-1] and b[0] < a[-1]
    overlap = min(a[-1], b[-1]) - max(a[0], b[0])
    assert overlap > 0.5 * min(a[-1] - a[0], b[-1] - b[0])
    for name, ts in times.items():
        print(f"{name}: {counts[name] / (ts[-1] - ts[0]):.0f} tok/s while the other model streamed")
    generate(server, "tiny2", prompt="", keep_alive=0)


def test_keep_alive_zero_unloads_after_the_request_and_leaves_nothing(server: Server) -> None:
    wait_for(lambda: "tiny2" not in loaded(server), timeout=15)
    before = Footprint(server)
    r = generate(server, "tiny2", keep_alive=0)
    assert r.status_code == 200, r.text
    wait_for(lambda: "tiny2" not in loaded(server), timeout=15)
    assert set(loaded(server)) == {"tiny"}
    wait_for(lambda: Footprint(server).new_since(before) == (set(), set(), set()), timeout=15)


def test_unload_leaves_no_processes_segments_or_ipc_files(server: Server) -> None:
    wait_for(lambda: "tiny2" not in loaded(server), timeout=15)
    before = Footprint(server)
    assert generate(server, "tiny2", prompt="", keep_alive=-1).json()["done_reason"] == "load"
    during = Footprint(server)
    added = during.new_since(before)
    assert "tiny2" in loaded(server) and loaded(server)["tiny2"]["expires_at"].startswith("2318")
    # An empty prompt with keep_alive 0 unloads at once (ollama's `stop`).
    r = generate(server, "tiny2", prompt="", keep_alive=0)
    assert r.json()["done_reason"] == "unload"
    assert "tiny2" not in loaded(server)
    assert_gone(server, added)


def test_a_short_keep_alive_expires(server: Server) -> None:
    r = generate(server, "tiny3", keep_alive="1s")
    assert r.status_code == 200, r.text
    assert "tiny3" in loaded(server)
    took = wait_for(lambda: "tiny3" not in loaded(server), timeout=15)
    assert took < 10


def test_chat_and_embed_take_keep_alive(server: Server) -> None:
    body = {"model": "tiny2", "messages": [], "keep_alive": "10m"}
    r = httpx.post(server.url + "/api/chat", json=body, timeout=60)
    assert r.json()["done_reason"] == "load"
    expires = loaded(server)["tiny2"]["expires_at"]
    r = httpx.post(
        server.url + "/api/embed", json={"model": "tiny2", "input": "x", "keep_alive": 0}, timeout=60
    )
    assert r.status_code == 200, r.text
    wait_for(lambda: "tiny2" not in loaded(server), timeout=15)
    assert expires > time.strftime("%Y-%m-%dT%H:%M", time.gmtime(time.time() + 540))


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [1]])
def test_a_bad_keep_alive_is_a_400(server: Server, value: object) -> None:
    r = generate(server, "tiny", keep_alive=value)
    assert r.status_code == 400
    assert "keep_alive" in r.json()["error"]


def test_an_unknown_model_is_a_404(server: Server) -> None:
    r = generate(server, "nothere")
    assert r.status_code == 404 and "not found" in r.json()["error"]


def test_eviction_under_a_memory_cap(home: Path) -> None:
    one = _one_size(home)
    # Room for the server's own model and one more, not two more.
    s = _server(_sibling(home), "--memory-limit", str(2 * one + one // 2))
    try:
        assert generate(s, "tiny2").status_code == 200
        assert set(loaded(s)) == {"tiny", "tiny2"}
        r = generate(s, "tiny3")
        assert r.status_code == 200, r.text
        assert set(loaded(s)) == {"tiny", "tiny3"}  # tiny2 (idle, least recently used) went

        # A model with a request in flight is never evicted: the load is refused, with the sizes.
        assert generate(s, "tiny2").status_code == 200  # evicts tiny3
        long = {"model": "tiny2", "prompt": "go", "options": LONG}
        got_first = threading.Event()
        done: list[dict] = []

        def stream() -> None:
            with httpx.stream("POST", s.url + "/api/generate", json=long, timeout=120) as r:
                for line in r.iter_lines():
                    got_first.set()
                    if line and json.loads(line)["done"]:
                        done.append(json.loads(line))

        t = threading.Thread(target=stream)
        t.start()
        assert got_first.wait(60)
        r = generate(s, "tiny3")
        assert r.status_code == 503, r.text
        msg = r.json()["error"]
        assert f"needs {one} bytes" in msg and "bytes are available" in msg
        assert "tiny2" in loaded(s)
        t.join(120)
        assert done and done[0]["eval_count"] == LONG["num_predict"]
    finally:
        assert s.stop() == 0


def test_a_model_larger_than_the_budget_is_refused(home: Path) -> None:
    one = _one_size(home)
    s = _server(_sibling(home), "--memory-limit", str(one + one // 2))
    try:
        r = generate(s, "tiny2")
        assert r.status_code == 503
        assert f"needs {one} bytes" in r.json()["error"]
        assert set(loaded(s)) == {"tiny"}
        assert generate(s, "tiny").status_code == 200
    finally:
        assert s.stop() == 0


def test_max_loaded_models(home: Path) -> None:
    s = _server(_sibling(home), "--max-loaded-models", "2")
    try:
        assert generate(s, "tiny2").status_code == 200
        assert generate(s, "tiny3").status_code == 200
        assert set(loaded(s)) == {"tiny", "tiny3"}
    finally:
        assert s.stop() == 0


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    # --url: the eviction tests' servers share this TANDEM_HOME, and its server record.
    cmd = [sys.executable, "-m", "tandem.cli", *args, "--url", server.url]
    return subprocess.run(cmd, env=server.env, capture_output=True, text=True, timeout=60)


def test_tandem_run_loads_the_model_and_stop_model_unloads_it(server: Server) -> None:
    wait_for(lambda: "tiny3" not in loaded(server), timeout=15)
    before = Footprint(server)
    r = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "run", "tiny3", "--url", server.url],
        env=server.env,
        input="/bye\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "tiny3" in loaded(server)
    ps = _cli(server, "ps")
    assert ps.returncode == 0, ps.stderr
    assert re.search(r"tiny:latest .* Forever", ps.stdout), ps.stdout
    assert re.search(r"tiny3:latest .* minutes from now", ps.stdout), ps.stdout
    r = _cli(server, "stop", "tiny3")
    assert r.returncode == 0 and "unloaded tiny3" in r.stdout, r.stderr
    assert "tiny3" not in loaded(server)
    wait_for(lambda: Footprint(server).new_since(before) == (set(), set(), set()), timeout=15)
    assert server.proc is not None and server.proc.poll() is None  # the server itself runs on
    r = _cli(server, "stop", "tiny")
    assert r.returncode == 1 and "stays loaded" in r.stderr
    assert "tiny" in loaded(server)
    r = _cli(server, "stop", "ghost")
    assert r.returncode == 1 and "not found" in r.stderr
