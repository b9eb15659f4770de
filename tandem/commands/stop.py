"""`tandem stop`: ask the running server to shut down gracefully (SIGTERM drains) and wait for it;
`tandem stop MODEL` unloads one model from it instead, as `ollama stop MODEL` does."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import click

from tandem.commands.ps import server_info, server_info_path, url_option


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


def _unload(model: str, url: str | None, timeout: float) -> None:
    """ollama's way: an empty generate with keep_alive 0 unloads the model once it is idle."""
    import httpx

    from tandem.commands.ps import no_server, server_url

    base = server_url(url)
    body = {"model": model, "prompt": "", "keep_alive": 0, "stream": False}
    try:
        r = httpx.post(f"{base}/api/generate", json=body, timeout=timeout)
    except httpx.HTTPError:
        raise no_server(base) from None
    if r.status_code != 200:
        msg = (
            r.json().get("error", r.text)
            if r.headers.get("content-type", "").startswith("application/json")
            else r.text
        )
        raise click.ClickException(f"cannot stop {model}: {msg}")
    ps = httpx.get(f"{base}/api/ps", timeout=timeout).json().get("models", [])
    if any(m.get("tandem", {}).get("resident") and _names_match(model, m.get("name", "")) for m in ps):
        raise click.ClickException(
            f"{model} is the server's own model (serve --model) and stays loaded; "
            "`tandem stop` without a model stops the server"
        )
    click.echo(f"unloaded {model}")


def _names_match(asked: str, loaded: str) -> bool:
    return loaded in (asked, f"{asked}:latest")


@click.command()
@click.argument("model", required=False)
@url_option
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server to finish running requests and exit.",
)
def stop(model: str | None, url: str | None, timeout: float) -> None:
    """Stop the running server: running requests finish (up to its --drain-timeout), then it exits.
    With MODEL, unload only that model (the server's own --model model stays loaded)."""
    if model:
        _unload(model, url, timeout)
        return
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
