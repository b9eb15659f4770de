"""engine_options: every default is EngineConfig's own, and each option lands in its field."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click
from click.testing import CliRunner

from tandem.commands.options import ENGINE_OPTION_FIELDS, engine_config, engine_options
from tandem.config import EngineConfig


@click.command()
@engine_options
def _show(**kw: Any) -> None:
    cfg = engine_config("m.gguf", "m", kw)
    click.echo(json.dumps({f: getattr(cfg, f) for f in ENGINE_OPTION_FIELDS}))


def _run(*args: str) -> dict[str, Any]:
    res = CliRunner().invoke(_show, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_no_options_give_the_dataclass_defaults() -> None:
    defaults = dataclasses.asdict(EngineConfig("m.gguf"))
    assert _run() == {f: defaults[f] for f in ENGINE_OPTION_FIELDS}


def test_options_set_their_fields() -> None:
    got = _run("--kv-cache-memory", "1G", "--no-overlap", "--num-ctx", "64", "--max-queue", "3")
    assert (got["kv_cache_memory"], got["overlap"], got["context_length"], got["max_queue"]) == (
        2**30,
        False,
        64,
        3,
    )


def test_a_bad_size_names_the_option() -> None:
    res = CliRunner().invoke(_show, ["--kv-cache-memory", "lots"])
    assert res.exit_code == 2 and "not a size: 'lots'" in res.output and "--kv-cache-memory" in res.output
