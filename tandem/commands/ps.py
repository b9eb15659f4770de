"""`tandem ps`: what a running server has loaded, how busy it is, and its memory plan.

Also home of the helpers the client commands (run, ps, stop) share to find a running server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from tandem.paths import tandem_home

DEFAULT_URL = "http://127.0.0.1:11434"


def server_info_path() -> Path:
    # Same path as tandem.gateway.server.server_info_path (a test holds them equal); importing that
    # module would cost the client commands half a second of engine imports.
    return tandem_home() / "run" / "server.json"


def server_info() -> dict[str, Any] | None:
    try:
        info = json.loads(server_info_path().read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def server_url(url: str | None) -> str:
    """--url, else the running server's own record, else $TANDEM_HOST, else the default port."""
    if url:
        return url.rstrip("/") if "://" in url else f"http://{url}".rstrip("/")
    info = server_info()
    if info and info.get("http"):
        return str(info["http"]).rstrip("/")
    host = os.environ.get("TANDEM_HOST")
    if host:
        return host if "://" in host else f"http://{host}" + ("" if host.count(":") == 1 else ":11434")
    return DEFAULT_URL


def url_option(fn: Any) -> Any:
    return click.option(
        "--url", default=None, help="Server address [default: the running server, or http://127.0.0.1:11434]."
    )(fn)


def no_server(url: str) -> click.ClickException:
    return click.ClickException(
        f"no tandem server answers at {url}; start one with `tandem serve` (or `tandem serve --model NAME`)"
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _until(expires_at: str) -> str:
    """ollama's UNTIL column: "Forever" for a model that stays loaded, else how long it has left."""
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return "?"
    if when.year >= 2300:
        return "Forever"
    left = (when - datetime.now(UTC)).total_seconds()
    if left < 1:
        return "now"
    minutes, seconds = divmod(int(left), 60)
    return f"{minutes} minutes from now" if minutes else f"{seconds} seconds from now"


@click.command()
@url_option
@click.option("--json", "as_json", is_flag=True, help="Print /api/ps as JSON.")
def ps(url: str | None, as_json: bool) -> None:
    """Show the models a running server has loaded, their load, expiry and memory plans."""
    import httpx

    base = server_url(url)
    try:
        r = httpx.get(f"{base}/api/ps", timeout=10)
    except httpx.HTTPError:
        raise no_server(base) from None
    if r.status_code != 200:
        raise click.ClickException(f"{base}/api/ps answered {r.status_code}: {r.text[:200]}")
    data = r.json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    rows = [("NAME", "SIZE", "PROCESSOR", "CONTEXT", "RUNNING", "WAITING", "KV BLOCKS", "UNTIL")]
    plans = []
    for m in data.get("models", []):
        t = m.get("tandem", {})
        device = str(t.get("device", "cpu"))
        used, total = t.get("kv_blocks_used"), t.get("kv_blocks_total")
        rows.append(
            (
                m.get("name", "?"),
                human_bytes(m.get("size", 0)),
                "100% GPU" if device.startswith("cuda") else "100% CPU",
                str(m.get("context_length", "")),
                str(t.get("running", "?")),
                f"{t.get('waiting', '?')}/{t.get('max_queue', '?')}",
                f"{used}/{total}" if total is not None else "?",
                _until(m.get("expires_at", "")),
            )
        )
        plans.append((m.get("name", "?"), t))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("    ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]))
    for name, t in plans:
        plan = t.get("memory_plan") or {}
        parts = [
            f"{label} {human_bytes(plan[key])}"
            for key, label in (
                ("weights_bytes", "weights"),
                ("kv_cache_bytes", "KV cache"),
                ("activations_bytes", "activations"),
            )
            if isinstance(plan.get(key), int | float)
        ]
        if plan.get("dense_copy_bytes") and parts:  # the part of the weights that is packed layers' copies
            parts[0] += f" (dense copies {human_bytes(plan['dense_copy_bytes'])})"
        alive = "worker alive" if t.get("worker_alive") else "WORKER DOWN"
        planned = f", planned {human_bytes(t['planned_bytes'])}" if t.get("planned_bytes") else ""
        click.echo(
            f"\n{name}: {alive}, {', '.join(parts)} on {plan.get('device', '?')} "
            f"({plan.get('dtype', '?')}){planned}, overlap {'on' if t.get('overlap') else 'off'}"
        )
