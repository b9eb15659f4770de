"""Actor processes, end to end with real spawned processes: handshake, failures, heartbeats, stop.

Run: python -m pytest tests/actors -q
"""

from __future__ import annotations

import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from procs import children, running, wait_until

from tandem.actors import ActorHandle, ActorSpec, ActorStartError, make_runtime_dir, remove_runtime_dir
from tandem.actors import handle as handle_mod
from tandem.messages import ActorFailed

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # spawn passes sys.path on, so children can import actor_entries


# --------------------------------------------------------------------------------------
# process bookkeeping
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = children(os.getpid())
    yield
    handle_mod.stop_all(timeout=1.0)  # a failed test must not leave actors to the next one
    left: set[int] = set()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        left = children(os.getpid()) - before
        if not left:
            break
        time.sleep(0.05)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"child processes left behind: {sorted(left)}"
    assert multiprocessing.active_children() == []


@pytest.fixture
def rdir() -> Iterator[Path]:
    path = make_runtime_dir(prefix="tandem-test")
    assert path.stat().st_mode & 0o777 == 0o700
    yield path
    remove_runtime_dir(path)
    assert not path.exists()


def _spec(rdir: Path, entry: str, name: str = "", config: Any = None, **kw: Any) -> ActorSpec:
    kw.setdefault("heartbeat_interval", 0.1)
    kw.setdefault("heartbeat_timeout", 2.0)
    kw.setdefault("ready_timeout", 30.0)
    return ActorSpec(
        name=name or entry, entry=f"actor_entries:{entry}", config=config or {}, runtime_dir=rdir, **kw
    )


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_start_ready_stop_round_trip(rdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    info = {"a": [1, 2], "s": "x", "nested": {"k": 1.5}}
    h = ActorHandle.start(_spec(rdir, "echo", config={"info": info, "marker": str(marker)}))
    pid = h.pid
    assert h.ready is not None
    assert h.ready.info == {"echo": info, "pid": pid, "name": "echo"}
    assert h.ready.pid == pid and h.ready.name == "echo"
    assert h.is_alive() and h.exitcode is None and h.check() is None
    sockets = sorted(p.name for p in rdir.iterdir())
    assert len(sockets) == 2 and all(re.fullmatch(r"echo-(ctl|inbox)-[0-9a-f]{8}\.sock", s) for s in sockets)

    assert h.stop(reason="test over") == 0
    assert h.exitcode == 0 and not h.is_alive() and not running(pid)
    assert marker.read_text() == "cleaned:Stop message: test over"
    assert list(rdir.iterdir()) == []  # socket files removed
    assert h.stop() == 0  # idempotent
    assert h.check() == "echo was stopped (exit code 0)"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "fail_before_ready",
            "actor 'fail_before_ready' failed to start: ValueError: boom before ready: bad config",
        ),
        ("no_such_function", "actor 'no_such_function' failed to start: AttributeError: "),
        (
            "exit_before_ready",
            "actor 'exit_before_ready' failed to start: exit_before_ready process exited with code 3",
        ),
    ],
)
def test_failure_before_ready_raises(rdir: Path, entry: str, expected: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ActorStartError) as info:
        ActorHandle.start(_spec(rdir, entry))
    assert str(info.value).startswith(expected)
    assert time.monotonic() - t0 < 15  # decided by the child's report or exit, never the 30 s timeout
    if entry == "fail_before_ready":
        assert "in fail_before_ready" in info.value.traceback
    assert list(rdir.iterdir()) == []


def test_ready_timeout(rdir: Path) -> None:
    with pytest.raises(ActorStartError, match=r"failed to start: not ready within 0\.5 s"):
        ActorHandle.start(_spec(rdir, "never_ready", ready_timeout=0.5))
    assert list(rdir.iterdir()) == []


def test_failure_after_ready_is_reported(rdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    h = ActorHandle.start(_spec(rdir, "fail_after_ready", name="worker", config={"marker": str(marker)}))
    # The owner's view: control socket and exit sentinel in its own poller.
    poller = zmq.Poller()
    poller.register(h.control_socket, zmq.POLLIN)
    poller.register(h.sentinel, zmq.POLLIN)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while h.exitcode is None and time.monotonic() < deadline:
        poller.poll(100)
        got += h.handle_control()
    assert h.check() == "worker process exited with code 1: RuntimeError: boom after ready second line"
    got += h.handle_control()
    failed = [m for m in got if isinstance(m, ActorFailed)]
    assert len(failed) == 1 and failed[0].pid == h.pid
    assert "boom after ready" in failed[0].traceback and "fail_after_ready" in failed[0].traceback
    assert marker.read_text() == "cleaned"
    assert h.stop() == 1


def test_sigkill_detected_promptly(rdir: Path) -> None:
    h = ActorHandle.start(_spec(rdir, "echo", name="worker"))
    h.kill()
    elapsed = wait_until(lambda: h.check() is not None, timeout=5.0)
    assert h.check() == "worker was killed by SIGKILL"
    assert elapsed < 1.0
    assert h.stop() == -signal.SIGKILL
    assert list(rdir.iterdir()) == []


def test_heartbeat_survives_busy_main_thread_and_silence_is_detected(rdir: Path) -> None:
    h = ActorHandle.start(
        _spec(
            rdir,
            "busy_then_hang",
            name="hang",
            config={"busy_s": 2.0},
            heartbeat_interval=0.1,
            heartbeat_timeout=1.0,
        )
    )
    t_ready = time.monotonic()
    while time.monotonic() - t_ready < 1.5:  # main thread busy, heartbeat thread still beating
        assert h.check() is None
        time.sleep(0.05)
    wait_until(lambda: h.check() is not None, timeout=5.0, step=0.05)
    problem = h.check()
    assert problem is not None
    m = re.fullmatch(r"hang sent no heartbeat for (\d+\.\d) s", problem)
    assert m, problem
    assert 1.0 <= float(m.group(1)) < 2.0
    assert h.is_alive()
    assert h.stop() == 0  # only the heartbeat stopped: the entry still honours Stop


@pytest.mark.parametrize("ignore_sigterm", [False, True])
def test_stop_escalates_on_stubborn_child(rdir: Path, tmp_path: Path, ignore_sigterm: bool) -> None:
    marker = tmp_path / "marker"
    h = ActorHandle.start(
        _spec(rdir, "stubborn", config={"marker": str(marker), "ignore_sigterm": ignore_sigterm})
    )
    t0 = time.monotonic()
    code = h.stop(timeout=2.0)
    elapsed = time.monotonic() - t0
    assert 1.2 <= elapsed < 4.0  # waited for the Stop message, then escalated within the timeout
    assert not running(h.pid)
    if ignore_sigterm:
        assert code == -signal.SIGKILL
        assert not marker.exists()  # SIGKILL: no cleanups, nothing else could run them
    else:
        assert code == 1  # the second SIGTERM forced an exit, after the cleanups
        assert marker.read_text() == "cleaned"
    assert list(rdir.iterdir()) == []


def test_spawning_thread_exit_is_not_parent_death(rdir: Path, tmp_path: Path) -> None:
    # Linux sends the parent-death signal when the spawning *thread* exits; the actor must not stop.
    marker = tmp_path / "marker"
    box: list[ActorHandle] = []
    t = threading.Thread(
        target=lambda: box.append(ActorHandle.start(_spec(rdir, "echo", config={"marker": str(marker)})))
    )
    t.start()
    t.join()
    h = box[0]
    time.sleep(1.0)  # > the watchdog period and any signal delivery
    assert h.is_alive() and h.check() is None
    assert not marker.exists()
    assert h.stop(reason="done") == 0
    assert marker.read_text() == "cleaned:Stop message: done"


_MIDDLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tandem.actors import ActorHandle, ActorSpec
    rdir, coop_marker, stubborn_marker = sys.argv[1:4]
    handles = [
        ActorHandle.start(ActorSpec(name=name, entry="actor_entries:orphan", runtime_dir=Path(rdir),
                                    config={"marker": marker, "stubborn": stubborn}, exit_grace=0.5,
                                    heartbeat_interval=0.2))
        for name, marker, stubborn in (("coop", coop_marker, False), ("stubborn", stubborn_marker, True))
    ]
    print(*(h.pid for h in handles), flush=True)
    time.sleep(60)
""")


def test_parent_death_makes_actors_exit_and_clean_up(rdir: Path, tmp_path: Path) -> None:
    markers = [tmp_path / "coop", tmp_path / "stubborn"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    middle = subprocess.Popen(
        [sys.executable, "-c", _MIDDLE, str(rdir), *map(str, markers)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    pids: list[int] = []
    try:
        ready, _, _ = select.select([middle.stdout], [], [], 30)
        assert ready and middle.stdout is not None, "middle process did not start its actors"
        pids = [int(x) for x in middle.stdout.readline().split()]
        assert len(pids) == 2 and all(running(p) for p in pids)
        assert all(m.exists() for m in markers)

        middle.kill()
        middle.wait()
        # coop returns at once; stubborn ignores stop_event and is forced out after exit_grace (0.5 s)
        elapsed = wait_until(lambda: not any(running(p) for p in pids), timeout=10.0)
        assert elapsed < 2.5
        assert not any(m.exists() for m in markers)  # cleanups ran on both exit paths
        assert Path(f"{markers[0]}.returned").read_text() == "parent died"  # coop returned by itself
        assert not Path(f"{markers[1]}.returned").exists()  # stubborn was forced out
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if middle.stdout is not None:
            middle.stdout.close()


_FORGETFUL_OWNER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tandem.actors import ActorHandle, ActorSpec
    h = ActorHandle.start(ActorSpec(name="w", entry="actor_entries:echo", runtime_dir=Path(sys.argv[1]),
                                    config={"marker": sys.argv[2]}))
    print(h.pid, flush=True)
""")


def test_owner_exit_without_stop_stops_actor(rdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    # Without the atexit hook, multiprocessing's own exit handler would join the actor forever.
    out = subprocess.run(
        [sys.executable, "-c", _FORGETFUL_OWNER, str(rdir), str(marker)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert not running(int(out.stdout))
    # The owner's exit gives the Stop message 1.2 s before SIGTERM; on a loaded machine the actor
    # can take longer to wind down, and the signal's cleanups then run instead: either way it ran them.
    assert marker.read_text() in ("cleaned:Stop message: owner exiting", "cleaned:SIGTERM")
    assert list(rdir.iterdir()) == []


def test_runtime_dirs_of_dead_owners_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tandem.actors.sockets import cleanup_stale_runtime_dirs, make_runtime_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f"tandem-t-{dead.stdout.strip()}-abcd1234"
    stale.mkdir()
    (stale / "x.sock").write_text("")
    foreign = tmp_path / "tandem-t-foreign"
    foreign.mkdir()
    live = tmp_path / f"tandem-t-{os.getpid()}-live"
    live.mkdir()
    assert cleanup_stale_runtime_dirs("tandem-t", tmp_path) == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()
    # A new server's directory sweeps up after a dead one, and names itself after its owner.
    (tmp_path / f"tandem-t-{dead.stdout.strip()}-again").mkdir()
    made = make_runtime_dir("tandem-t", base=tmp_path)
    assert made.name.startswith(f"tandem-t-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([foreign.name, live.name, made.name])
