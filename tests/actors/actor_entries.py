"""Entry functions for tests/actors: imported by name in spawned children (this dir is on sys.path)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tandem.actors import ActorContext


def _mark(path: str | None, text: str) -> None:
    if path:
        Path(path).write_text(text)


def echo(ctx: ActorContext) -> None:
    """Ready with the config's info; on the way out, write why it stopped to config['marker']."""
    cfg = ctx.config
    ctx.add_cleanup(lambda: _mark(cfg.get("marker"), f"cleaned:{ctx.stop_reason}"))
    ctx.send_ready({"echo": cfg.get("info"), "pid": os.getpid(), "name": ctx.name})
    ctx.wait_for_stop()


def fail_before_ready(ctx: ActorContext) -> None:
    raise ValueError("boom before ready: bad config")


def exit_before_ready(ctx: ActorContext) -> None:
    os._exit(3)  # dies without a word, as a segfault or OOM kill would


def never_ready(ctx: ActorContext) -> None:
    ctx.wait_for_stop()


def fail_after_ready(ctx: ActorContext) -> None:
    ctx.add_cleanup(lambda: _mark(ctx.config.get("marker"), "cleaned"))
    ctx.send_ready({})
    time.sleep(0.2)
    raise RuntimeError("boom after ready\nsecond line")


def busy_then_hang(ctx: ActorContext) -> None:
    """Hold the main thread in pure-Python work, then stop heartbeats as a hung process would."""
    ctx.send_ready({})
    end = time.monotonic() + ctx.config["busy_s"]
    n = 0
    while time.monotonic() < end:
        n += sum(range(1000))
    ctx.stop_heartbeat()
    ctx.wait_for_stop()


def stubborn(ctx: ActorContext) -> None:
    """Ignores Stop and stop_event; with config['ignore_sigterm'] ignores SIGTERM too."""
    ctx.add_cleanup(lambda: _mark(ctx.config.get("marker"), "cleaned"))
    if ctx.config.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx.send_ready({})
    while True:
        time.sleep(0.05)


def orphan(ctx: ActorContext) -> None:
    """Creates config['marker'] and removes it in a cleanup; cooperative unless config['stubborn'].

    A cooperative one that returns on its own (not forced out) leaves '<marker>.returned' with the reason.
    """
    marker = Path(ctx.config["marker"])
    marker.write_text(str(os.getpid()))
    ctx.add_cleanup(marker.unlink)
    ctx.send_ready({})
    if ctx.config.get("stubborn"):
        while True:
            time.sleep(0.05)
    ctx.wait_for_stop()
    Path(f"{marker}.returned").write_text(ctx.stop_reason)
