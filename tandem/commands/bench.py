"""`tandem bench`: the race against transformers and llama-server, overlap vs sync throughput,
scheduler CPU per step, model-stack timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

SECTION_CHOICES = (
    "all",
    "pipeline",
    "pipeline-tiny",
    "pipeline-model",
    "scheduler",
    "model-stack",
    "structured",
    "race",
)
# Options of the race alone: giving any of them without --section runs just the race.
RACE_PARAMS = (
    "batch_sizes",
    "prompt_len",
    "gen_len",
    "context_len",
    "modes",
    "repeats",
    "llama_server",
    "synthetic",
    "baseline_threads",
    "device",
    "output",
    "plot",
    "trace",
)
_QUICK_RACE = {"batch_sizes": (1, 4), "gen_len": 16, "repeats": 1}


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of integers: {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"batch sizes must be integers >= 1, got {value!r}")
    return sizes


def _mode_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    from tandem.bench.race import MODES

    if value is None:
        return None
    modes = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise click.BadParameter(
            f"unknown mode(s) {', '.join(bad) or value!r}; choose from {', '.join(MODES)}"
        )
    if len(set(modes)) != len(modes):
        raise click.BadParameter(f"a mode is named twice: {value!r}")
    return modes


def _synthetic_names() -> list[str]:
    from tandem.formats.synthetic import SHAPES

    return list(SHAPES)


_FILE = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.option(
    "--model",
    "-m",
    default=None,
    help="Real model of the race, pipeline-model and model-stack (default: smollm2:135m).",
)
@click.option("--quick", is_flag=True, help="Short runs: a smoke check, not figures to quote.")
@click.option(
    "--section",
    "sections",
    multiple=True,
    type=click.Choice(SECTION_CHOICES),
    help="Section to run (repeatable; default: all, or the race alone when a race option is given).",
)
@click.option("--json-out", type=_FILE, default=None, help="Also write every section's JSON here.")
@click.option("--threads", type=click.IntRange(1), default=None, help="tandem's worker CPU threads.")
@click.option("--batch-sizes", callback=_int_list, help="Race: concurrent requests per run [1,8,32].")
@click.option("--prompt-len", type=click.IntRange(1), default=None, help="Race: prompt tokens [32].")
@click.option("--gen-len", type=click.IntRange(1), default=None, help="Race: generated tokens [64].")
@click.option("--context-len", type=click.IntRange(2), default=None, help="Race: context per sequence [512].")
@click.option(
    "--modes", callback=_mode_list, help="Race: of sync,overlap,hf,llama.cpp [sync,overlap,hf(,llama.cpp)]."
)
@click.option("--repeats", type=click.IntRange(1), default=None, help="Race: measured runs per mode [3].")
@click.option(
    "--llama-server", type=_FILE, default=None, help="Race: a llama-server binary (the llama.cpp mode)."
)
@click.option(
    "--synthetic",
    type=click.Choice(_synthetic_names()),
    default=None,
    help="Race: random weights of this model's shape instead of a model file (the 7-8B ones: GPU only).",
)
@click.option(
    "--baseline-threads",
    type=click.IntRange(1),
    default=None,
    help="Race: hf's torch threads and llama-server's -t (default: tandem's worker threads).",
)
@click.option("--device", default=None, help="Race: cpu, cuda or cuda:N [cpu].")
@click.option("--output", type=_FILE, default=None, help="Race: write its JSON (machine, model, runs) here.")
@click.option(
    "--plot", type=_FILE, default=None, help="Race: tok/s against batch size as a PNG (matplotlib)."
)
@click.option("--trace", type=_FILE, default=None, help="Race: a Chrome/Perfetto trace of tandem's steps.")
def bench(
    model: str | None,
    quick: bool,
    sections: tuple[str, ...],
    json_out: Path | None,
    threads: int | None,
    **race_kw: Any,
) -> None:
    """Race tandem against transformers and llama-server; benchmark the step pipeline (overlap vs
    --no-overlap), the scheduler and the model stack. See benchmarks/README.md."""
    from tandem.bench import BenchOptions, expand_sections, format_report, run_bench
    from tandem.bench.samples import BenchError
    from tandem.bench.timing import round_floats

    given = [p for p in RACE_PARAMS if race_kw[p] is not None]
    if not sections:
        sections = ("race",) if given else ("all",)
    if given and "race" not in sections and "all" not in sections:
        names = ", ".join("--" + p.replace("_", "-") for p in given)
        raise click.UsageError(f"{names}: options of the race section; add --section race")
    race = _race_options(model, threads, quick, race_kw) if "race" in expand_sections(sections) else None
    if race_kw["plot"] is not None:
        _check_matplotlib()
    opts = BenchOptions(sections=sections, quick=quick, model=model, threads=threads, race=race)
    try:
        results = run_bench(opts, progress=lambda msg: click.echo(msg, err=True))
    except BenchError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_report(results), nl=False)
    if json_out is not None:
        _write_json(json_out, round_floats(results))
    if "race" in results:
        _race_outputs(results["race"], race_kw)


def _race_options(model: str | None, threads: int | None, quick: bool, kw: dict[str, Any]) -> Any:
    from tandem.bench.race import RaceOptions

    values = {k: kw[k] for k in RACE_PARAMS if k not in ("output", "plot") and kw[k] is not None}
    if quick:
        values = {**_QUICK_RACE, **values}
    opts = RaceOptions(model=model, threads=threads, **values)
    try:
        opts.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return opts


def _check_matplotlib() -> None:
    """Before the race, not after its minutes: --plot without matplotlib is refused at once."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install 'tandem-llm[bench]'") from None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    click.echo(f"results written to {path}", err=True)


def _race_outputs(doc: dict[str, Any], kw: dict[str, Any]) -> None:
    from tandem.bench.timing import round_floats

    if kw["output"] is not None:
        _write_json(kw["output"], round_floats(doc))
    if kw["plot"] is not None:
        from tandem.bench.plot import plot_race

        try:
            plot_race(doc, kw["plot"])
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"plot written to {kw['plot']}", err=True)
    if kw["trace"] is not None:
        click.echo(f"trace written to {kw['trace']} (open it in https://ui.perfetto.dev)", err=True)
