"""`tandem serve`: the gateway process (HTTP + ZeroMQ) over the scheduler and worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from tandem.commands.options import ByteSize, engine_config, engine_options


def _split_host(value: str) -> tuple[str, int | None]:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return (host or value), (int(port) if port.isdigit() else None)


def _origins(flags: tuple[str, ...]) -> tuple[str, ...]:
    """--origins and $TANDEM_ORIGINS (comma-separated) together, checked before the model loads."""
    from tandem.gateway.http.middleware import OriginPolicy

    env = tuple(o.strip() for o in os.environ.get("TANDEM_ORIGINS", "").split(",") if o.strip())
    try:
        OriginPolicy((*flags, *env))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--origins' / TANDEM_ORIGINS") from None
    return (*flags, *env)


def _allowed_hosts(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from tandem.gateway.http.middleware import configured_host

    for v in value:
        try:
            configured_host(v)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


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
    help="Also serve the ZeroMQ protocol on tcp://ZMQ_HOST:PORT (ipc is always on).",
)
@click.option(
    "--zmq-host",
    default="127.0.0.1",
    show_default=True,
    help="Address for --zmq-port, whatever --host is: the ZeroMQ protocol has no authentication.",
)
@click.option("--no-http", is_flag=True, help="Serve only the ZeroMQ protocol.")
@click.option(
    "--allowed-host",
    multiple=True,
    callback=_allowed_hosts,
    help="Extra Host header names to accept (DNS rebinding guard).",
)
@click.option(
    "--origins",
    multiple=True,
    help="Extra web origins allowed to call the server (repeatable; '*' = all, "
    "https://*.example.com); also $TANDEM_ORIGINS, comma-separated.",
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
@click.option(
    "--send-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a streamed reply (HTTP or ZeroMQ) may wait on a client that stopped reading before "
    "its request is cancelled (its KV blocks freed).",
)
@click.option(
    "--special-tokens-in-messages",
    is_flag=True,
    help="Read control-token text in chat messages (<|im_end|>...) as control tokens. By default it "
    "is plain text, so a user cannot end their turn and write the system's.",
)
@click.option(
    "--trace-steps",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Record the timings of the last N steps (scheduler prep, worker compute) for GET /api/trace "
    "(tandem bench --trace draws them); 0: off.",
)
@click.option(
    "--max-loaded-models",
    type=click.IntRange(0),
    default=0,
    help="Most models loaded at once (each its own scheduler and worker); 0: as many as the memory "
    "budget fits.  [default: 0]",
)
@click.option(
    "--keep-alive",
    default="5m",
    show_default=True,
    help="How long a model stays loaded after its last request: a duration (10m, 1h, 0), seconds, "
    "or -1 for forever; a request's own keep_alive overrides it. The --model model stays loaded.",
)
@click.option("--memory-limit", type=ByteSize(), default=None, hidden=True)  # tests cap the budget
@engine_options
def serve(
    model: str | None,
    host: str,
    port: int | None,
    zmq_port: int | None,
    zmq_host: str,
    no_http: bool,
    allowed_host: tuple[str, ...],
    origins: tuple[str, ...],
    local_model_dirs: tuple[Path, ...],
    store_timeout: float,
    drain_timeout: float,
    send_timeout: float,
    special_tokens_in_messages: bool,
    trace_steps: int,
    max_loaded_models: int,
    keep_alive: str,
    memory_limit: int | None,
    **kw: Any,
) -> None:
    """Serve a model over HTTP (ollama and OpenAI APIs) and the ZeroMQ protocol."""
    from tandem.gateway.http.errors import ApiError
    from tandem.gateway.http.model_pool import parse_keep_alive
    from tandem.gateway.http.state import HttpSettings
    from tandem.gateway.listen import ServeError
    from tandem.gateway.server import ServeConfig
    from tandem.gateway.server import serve as run
    from tandem.store.local_paths import allowed_roots
    from tandem.store.model_store import ensure_model

    try:
        keep = parse_keep_alive(keep_alive, "--keep-alive")
    except ApiError as e:
        raise click.BadParameter(e.message.removeprefix("invalid parameter '--keep-alive': ")) from None
    h, p = _split_host(host)
    allowed_origins = _origins(origins)
    ref = ensure_model(model, progress=True)
    engine = engine_config(str(ref.path), ref.name, kw, trace_steps=trace_steps)
    settings = HttpSettings(
        allowed_hosts=allowed_host,
        origins=allowed_origins,
        local_model_dirs=allowed_roots(local_model_dirs),
        store_timeout=store_timeout,
        send_timeout=send_timeout,
        special_in_messages=special_tokens_in_messages,
        keep_alive=keep,
        max_loaded_models=max_loaded_models,
        memory_limit=memory_limit or 0,
    )
    cfg = ServeConfig(
        engine=engine,
        http_settings=settings,
        host=h,
        port=port if port is not None else (p if p is not None else 11434),
        http=not no_http,
        zmq_tcp_port=zmq_port,
        zmq_host=zmq_host.strip("[]"),
        drain_timeout=drain_timeout,
    )
    try:
        code = run(cfg)
    except ServeError as e:  # a port that is taken, an address that is not ours: one line, no traceback
        raise click.ClickException(str(e)) from None
    sys.exit(code)
