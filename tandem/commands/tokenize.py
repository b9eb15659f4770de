"""`tandem tokenize`: print the token ids of a text (a debugging tool, like llama-tokenize)."""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("text")
@click.option("--model", "-m", default=None, help="Model name or path (default: smollm2:135m).")
@click.option("--no-parse-special", is_flag=True, help="Treat control tokens written in TEXT as plain text.")
@click.option("--add-bos/--no-add-bos", default=None, help="Prepend BOS (default: the model's setting).")
@click.option("--pieces", is_flag=True, help="Print [id, piece] pairs instead of ids.")
def tokenize(
    text: str, model: str | None, no_parse_special: bool, add_bos: bool | None, pieces: bool
) -> None:
    """Print TEXT's token ids as JSON ('-' reads stdin)."""
    from tandem.store.model_store import ensure_model
    from tandem.tokenizer.model_files import load_tokenizer

    if text == "-":
        text = sys.stdin.read()
    ref = ensure_model(model, progress=True)
    tok = load_tokenizer(str(ref.path))
    ids = tok.encode(text, add_bos=add_bos, parse_special=not no_parse_special)
    out = [[i, tok.id_to_piece(i)] for i in ids] if pieces else ids
    click.echo(json.dumps(out, ensure_ascii=False))
