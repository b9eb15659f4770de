"""--enforce-eager: an engine option from the CLI down to the worker; on the CPU it changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from click.testing import CliRunner

from tandem.commands.options import engine_config, engine_options
from tandem.formats.tiny import TinySpec, write_tiny_gguf


@click.command()
@engine_options
def _show(**kw: Any) -> None:
    click.echo(json.dumps(engine_config("m.gguf", "m", kw).enforce_eager))


def test_the_flag_sets_the_engine_config() -> None:
    assert CliRunner().invoke(_show, []).output.strip() == "false"
    assert CliRunner().invoke(_show, ["--enforce-eager"]).output.strip() == "true"


def test_generate_with_enforce_eager_on_the_cpu(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "t.gguf", TinySpec(seed=6))
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "home"), "PYTHONPATH": os.pathsep.join(sys.path)}
    base = [sys.executable, "-m", "tandem.cli", "generate", "--model", str(model), "--device", "cpu"]
    base += ["--raw", "--json", "--temperature", "0", "--max-tokens", "6", "--num-ctx", "128", "hello"]
    # Through the scheduler's WorkerConfig into the worker process, which starts and generates.
    proc = subprocess.run([*base, "--enforce-eager"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 6
