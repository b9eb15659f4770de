"""`tandem bench`: overlap vs sync throughput, scheduler CPU per step, model-stack timings."""

from __future__ import annotations

import json
from pathlib import Path

import click

SECTION_CHOICES = ("all", "pipeline", "pipeline-tiny", "pipeline-model", "scheduler", "model-stack")


@click.command()
@click.option(
    "--model",
    "-m",
    default=None,
    help="Real model for pipeline-model and model-stack (default: smollm2:135m).",
)
@click.option("--quick", is_flag=True, help="Short runs: a smoke check, not figures to quote.")
@click.option(
    "--section",
    "sections",
    multiple=True,
    type=click.Choice(SECTION_CHOICES),
    help="Section to run (repeatable; default: all).",
)
@click.option(
    "--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write JSON here."
)
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="Worker CPU threads in the pipeline runs."
)
def bench(
    model: str | None, quick: bool, sections: tuple[str, ...], json_out: Path | None, threads: int | None
) -> None:
    """Benchmark the step pipeline (overlap vs --no-overlap), the scheduler and the model stack."""
    from tandem.bench import BenchOptions, format_report, run_bench
    from tandem.bench.timing import round_floats

    opts = BenchOptions(sections=sections or ("all",), quick=quick, model=model, threads=threads)
    results = run_bench(opts, progress=lambda msg: click.echo(msg, err=True))
    click.echo(format_report(results), nl=False)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(round_floats(results), indent=2) + "\n")
        click.echo(f"results written to {json_out}", err=True)
