"""`tandem serve`: the gateway process (HTTP + ZeroMQ) over the scheduler and worker processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from tandem.commands.options import current_log_level, engine_config, engine_options


def _split_host(value: str) -> tuple[str, int | None]:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return (host or value), (int(port) if port.isdigit() else None)


@click.command()
@click.option("--model", "-m", default=None, help="Model to load (default: smollm2:135m, pulled if missing).")
@click.option(
    "--host",
    envvar="TANDEM_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address (host or host:port) for HTTP; $TANDEM_HOST. Loopback unless told otherwise.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="HTTP port [default: 11434].")
@click.option(
    "--zmq-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Also serve the ZeroMQ protocol on tcp://HOST:PORT (ipc is always on).",
)
@click.option("--no-http", is_flag=True, help="Serve only the ZeroMQ protocol.")
@click.option(
    "--allowed-host", multiple=True, help="Extra Host header names to accept (DNS rebinding guard)."
)
@click.option(
    "--allow-local-models",
    "local_model_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="DIR",
    help="Let HTTP clients pull local model files, by absolute path, from DIR (repeatable). "
    "Without it /api/pull takes only catalogue, ollama and hf:// models.",
)
@click.option(
    "--store-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds /api/tags, /api/show, /api/ps and /api/delete may spend on model files before a 504.",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds running requests get to finish after SIGTERM.",
)
@engine_options
def serve(
    model: str | None,
    host: str,
    port: int | None,
    zmq_port: int | None,
    no_http: bool,
    allowed_host: tuple[str, ...],
    local_model_dirs: tuple[Path, ...],
    store_timeout: float,
    drain_timeout: float,
    **kw: Any,
) -> None:
    """Serve a model over HTTP (ollama and OpenAI APIs) and the ZeroMQ protocol."""
    from tandem.gateway.server import ServeConfig
    from tandem.gateway.server import serve as run
    from tandem.models.store import ensure_model

    h, p = _split_host(host)
    ref = ensure_model(model, progress=True)
    cfg = ServeConfig(
        engine=engine_config(str(ref.path), ref.name, kw, current_log_level()),
        host=h,
        port=port if port is not None else (p if p is not None else 11434),
        http=not no_http,
        zmq_tcp_port=zmq_port,
        allowed_hosts=allowed_host,
        local_model_dirs=local_model_dirs,
        store_timeout=store_timeout,
        drain_timeout=drain_timeout,
    )
    sys.exit(run(cfg))
