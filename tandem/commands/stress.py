"""`tandem stress`: the long version of the load, overflow, slow-reader, ZeroMQ-fuzz and soak
scenarios (tandem/stress), each against a `tandem serve` of its own on tiny random models,
loopback only."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Seconds from ``10m``, ``1h30m``, ``90s`` or ``90``."""
    if value is None:
        return None
    text = value.strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        seconds = float(text)
    elif parts and "".join(n + u for n, u in parts) == text:
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        seconds = 0.0
    if seconds <= 0:
        raise click.BadParameter(f"must be a positive duration such as 10m or 1h30m, not {value!r}")
    return seconds


@click.command()
@click.option(
    "--duration",
    default=None,
    callback=_duration,
    help="How long the soak runs (10m, 1h, seconds); without it, 10,000 requests however long they take.",
)
@click.option(
    "--scale",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Override each scenario's long scale (1 = the CI-bounded run).",
)
@click.option(
    "--scenario", "names", multiple=True, help="Run only these scenarios (repeatable) [default: all]."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the results as JSON.",
)
def stress(duration: float | None, scale: float | None, names: tuple[str, ...], output: Path | None) -> None:
    """Load and soak a real server: concurrent streams, queue overflow, slow readers, a long soak."""
    from tandem.stress.registry import SCENARIOS, StressParams
    from tandem.stress.result import ScenarioResult

    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise click.BadParameter(
            f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}", param_hint="--scenario"
        )
    results = []
    for scenario in (SCENARIOS[n] for n in (names or SCENARIOS)):
        click.echo(f"== {scenario.name}: {scenario.description}", err=True)
        try:
            result = scenario.run(StressParams(scale or scenario.long_scale, duration))
        except Exception as e:  # a scenario that could not finish is a failure to report, with the others
            result = ScenarioResult(scenario.name, failures=[f"{type(e).__name__}: {e}"])
        results.append(result)
        for f in result.figures:
            click.echo(f"{scenario.name:12} {f.name:48} {f.shown()}")
        status = "passed" if result.passed else "FAILED: " + "; ".join(result.failures)
        click.echo(f"{scenario.name:12} {'result':48} {status} ({result.seconds:.0f} s)")
    if output is not None:
        output.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    if not all(r.passed for r in results):
        sys.exit(1)
