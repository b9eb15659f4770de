"""`tandem stop`: ask the running server to shut down gracefully (SIGTERM drains) and wait for it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import click

from tandem.commands.ps import server_info, server_info_path


def _state(pid: int) -> str | None:
    """The process state letter from /proc, or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): existence only
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")  # a zombie has exited; only its parent has not reaped it


def _is_tandem(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell (not Linux): trust the record
    return b"tandem" in cmd


@click.command()
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server to finish running requests and exit.",
)
def stop(timeout: float) -> None:
    """Stop the running server: running requests finish (up to its --drain-timeout), then it exits."""
    path = server_info_path()
    info = server_info()
    if not info or not isinstance(info.get("pid"), int):
        raise click.ClickException(f"no tandem server is running (no record at {path})")
    pid = info["pid"]
    if not alive(pid) or not _is_tandem(pid):
        with contextlib.suppress(OSError):
            path.unlink()  # left behind by a server that was killed
        raise click.ClickException(f"no tandem server is running (pid {pid} in {path} is gone)")
    os.kill(pid, signal.SIGTERM)
    click.echo(f"stopping tandem server (pid {pid}, {info.get('model') or 'model'})...", err=True)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"server (pid {pid}) did not exit within {timeout:g} s; it may still be draining "
                f"(`kill -INT {pid}` twice forces it)"
            )
        time.sleep(0.1)
    click.echo("stopped")
