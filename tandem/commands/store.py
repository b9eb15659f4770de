"""Store commands: `pull`, `list`, `show`, `rm`, `cp` and `create`. They touch only the local store, never
a server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from tandem.errors import InvalidModelNameError, ModelNotFoundError
from tandem.store.describe import describe_model
from tandem.store.model_store import (
    copy_model,
    create_model,
    inspect_path,
    list_models,
    pull_model,
    remove_model,
    resolve_model,
)
from tandem.store.modelfile import parse_modelfile
from tandem.store.registry import DEFAULT_MODEL, ModelRef


@click.command()
@click.argument("model", required=False)
@click.option("--name", help="Store name for a local path, hf:// file or ollama model.")
def pull(model: str | None, name: str | None) -> None:
    """Fetch MODEL into the store (default: smollm2:135m).

    MODEL is a catalogue name, a local .gguf file or safetensors folder, hf://owner/repo/file.gguf,
    or the name of a model ollama has pulled (llama3.2:1b).
    """
    ref = pull_model(model or DEFAULT_MODEL, progress=True, name=name)
    click.echo(f"{ref.name}: {ref.path} ({human_size(ref.size_bytes)}, {ref.format})")


@click.command("list")
def list_() -> None:
    """List the models in the store."""
    rows = [("NAME", "SIZE", "FORMAT", "MODIFIED")]
    rows += [(r.name, human_size(r.size_bytes), r.format, human_age(r.modified)) for r in list_models()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("    ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]))


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print every detail as JSON.")
def show(model: str, as_json: bool) -> None:
    """Show a model's details.

    Architecture, parameters, quantization, context length and chat template of MODEL (a stored
    name, or a path to a .gguf file or safetensors folder).
    """
    info = describe_model(_stored_or_local(model))
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@click.command()
@click.argument("model")
def rm(model: str) -> None:
    """Remove MODEL from the store.

    Files the store downloaded are deleted; a registered local file or ollama blob is kept.
    """
    remove_model(model)
    click.echo(f"deleted '{model}'")


@click.command()
@click.argument("source")
@click.argument("destination")
def cp(source: str, destination: str) -> None:
    """Copy SOURCE to a new name, DESTINATION (the file is shared, not duplicated)."""
    ref = copy_model(source, destination)
    click.echo(f"copied '{source}' to '{ref.name}'")


@click.command()
@click.argument("name")
@click.option(
    "-f",
    "--file",
    "modelfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default="Modelfile",
    show_default=True,
    help="The Modelfile: FROM, SYSTEM, PARAMETER, TEMPLATE, MESSAGE, LICENSE.",
)
def create(name: str, modelfile: Path) -> None:
    """Create NAME from a Modelfile: a stored model plus defaults (system prompt, parameters, template).

    The new model shares its base's weights file. TEMPLATE is a Jinja chat template, as GGUF files carry.
    """
    try:
        text = modelfile.read_text()
    except OSError as e:
        raise click.ClickException(f"cannot read {modelfile}: {e.strerror}") from e
    _, defaults = parse_modelfile(text)
    ref = create_model(name, defaults)
    base = ref.defaults.base if ref.defaults else defaults.base
    click.echo(f"created '{ref.name}' from '{base}'")


def _stored_or_local(model: str) -> ModelRef:
    try:
        return resolve_model(model)
    except (ModelNotFoundError, InvalidModelNameError):
        path = Path(model).expanduser()
        if path.exists():  # `show` also reads files that were never pulled
            return inspect_path(path)
        raise


def format_description(info: dict[str, Any]) -> str:
    heads = info.get("heads")
    if info.get("kv_heads") not in (None, heads):
        heads = f"{heads} ({info['kv_heads']} KV)"
    quant = ", ".join(f"{k} ({n})" for k, n in info["quantization"].items())
    sections: dict[str, list[tuple[str, Any]]] = {
        "Model": [
            ("architecture", info.get("architecture")),
            ("parameters", info.get("parameter_size")),
            ("context length", info.get("context_length")),
            ("embedding length", info.get("embedding_length")),
            ("layers", info.get("layers")),
            ("heads", heads),
            ("vocab size", info.get("vocab_size")),
            ("file type", info.get("file_type")),
            ("tensor types", quant),
        ],
        "File": [
            ("name", info["name"]),
            ("path", info["path"]),
            ("size", human_size(info["size_bytes"])),
            ("format", info["format"]),
            ("source", info["source"]),
            ("sha256", info.get("sha256")),
        ],
    }
    lines = []
    for title, items in sections.items():
        lines.append(f"  {title}")
        lines += [f"    {k:<18}{v}" for k, v in items if v not in (None, "")]
        lines.append("")
    if info.get("modelfile"):
        lines.append("  Modelfile")
        lines += [f"    {ln}" for ln in info["modelfile"].splitlines()]
        lines.append("")
    lines.append("  Chat template")
    template = (info.get("derived") or {}).get("template") or info.get("chat_template")
    lines += [f"    {ln}" for ln in template.splitlines()] if template else ["    (none)"]
    return "\n".join(lines)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_age(when: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - when).total_seconds()))
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            n = seconds // span
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
