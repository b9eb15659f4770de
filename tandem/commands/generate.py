"""`tandem generate`: one prompt through the two-process engine (or a running server with --url)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from tandem.commands.options import current_log_level, engine_config, engine_options
from tandem.messages import SamplingParams
from tandem.validation import validate_sampling

log = logging.getLogger(__name__)


def sampling_from_options(kw: dict[str, Any]) -> SamplingParams:
    params = SamplingParams(
        max_tokens=kw["max_tokens"],
        temperature=kw["temperature"],
        top_k=kw["top_k"],
        top_p=kw["top_p"],
        min_p=kw["min_p"],
        repetition_penalty=kw["repeat_penalty"],
        seed=kw["seed"],
        stop=list(kw["stop"]),
        logprobs=kw["logprobs"],
    )
    try:
        validate_sampling(params)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return params


def sampling_options(fn: Any) -> Any:
    opts = [
        click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True),
        click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=40, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=0.9, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Make sampling reproducible."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option(
            "--logprobs", type=click.IntRange(0, 20), default=None, help="Top-N logprobs per token."
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.command()
@click.argument("prompt")
@click.option(
    "--model", "-m", default=None, help="Model name or path (default: smollm2:135m, pulled if missing)."
)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--system", default=None, help="System message (chat models).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--url", default=None, help="Use a running `tandem serve` (its ZeroMQ endpoint) instead.")
@sampling_options
@engine_options
def generate(
    prompt: str, model: str | None, raw: bool, system: str | None, as_json: bool, url: str | None, **kw: Any
) -> None:
    """Generate a completion of PROMPT ('-' reads it from stdin)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    params = sampling_from_options(kw)
    if url:
        from tandem.commands.remote import generate_remote

        generate_remote(url, prompt, model, raw, system, params, as_json)
        return
    from tandem.engine.process import EngineProcess
    from tandem.engine.router import EngineError
    from tandem.engine.sync import SyncEngine
    from tandem.prompts.build import prompt_ids
    from tandem.store.model_store import ensure_model

    ref = ensure_model(model, progress=True)
    cfg = engine_config(str(ref.path), ref.name, kw, current_log_level())
    t0 = time.perf_counter()
    if sys.stderr.isatty() and not as_json:
        click.echo(f"loading {ref.name}...", err=True, nl=False)
    engine = EngineProcess(cfg)
    try:
        engine.start()
        load_s = time.perf_counter() - t0
        if sys.stderr.isatty() and not as_json:
            click.echo("\r\033[K", err=True, nl=False)
        assert engine.tokenizer is not None
        ids = prompt_ids(engine.tokenizer, prompt, raw=raw, system=system)

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        try:
            c = SyncEngine(engine).complete(ids, params, on_text=None if as_json else write)
        except EngineError as e:
            raise click.ClickException(str(e)) from None
    finally:
        engine.close()
    f = c.finished
    timings = {
        "load_s": round(load_s, 3),
        "total_s": round(c.wall_s, 3),
        "queued_s": round(f.queued_s, 4) if f else None,
        "prefill_s": round(f.prefill_s, 4) if f else None,
        "decode_s": round(f.decode_s, 4) if f else None,
        "prompt_tokens": len(ids),
        "completion_tokens": len(c.token_ids),
        "decode_tokens_per_s": round((len(c.token_ids) - 1) / f.decode_s, 2)
        if f and f.decode_s > 0
        else None,
    }
    if as_json:
        out = {
            "model": ref.name,
            "prompt_token_ids": ids,
            "token_ids": c.token_ids,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "timings": timings,
        }
        if params.logprobs is not None:
            out["logprobs"] = c.logprobs
        click.echo(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        log.info("timings: %s", timings)
