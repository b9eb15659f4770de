"""`tandem generate --url URL`: one prompt through a running `tandem serve` over the ZeroMQ protocol."""

from __future__ import annotations

import json
import sys
import time

import click

from tandem.client import TandemClient, TandemError
from tandem.messages import SamplingParams


def generate_remote(
    url: str,
    prompt: str,
    model: str | None,
    raw: bool,
    system: str | None,
    params: SamplingParams,
    as_json: bool,
) -> None:
    """Stream the completion to stdout, or print the same JSON object as the local path."""
    t0 = time.perf_counter()
    try:
        client = TandemClient(url, timeout=None)  # generation may legitimately take long
    except (TandemError, ValueError) as e:
        raise click.ClickException(_one_line(e)) from None
    try:
        assert client.server is not None
        served = client.server.model
        if model is not None and model != served:
            raise click.ClickException(f"the server at {url} serves {served!r}, not {model!r}")
        connect_s = time.perf_counter() - t0
        if not as_json:
            with client.stream(prompt, raw=raw, system=system, params=params) as s:
                for d in s:
                    sys.stdout.write(d.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            return
        c = client.generate(prompt, raw=raw, system=system, params=params)
    except TandemError as e:
        raise click.ClickException(_one_line(e)) from None
    finally:
        client.close()
    out = {
        "model": served,
        "prompt_token_ids": c.prompt_token_ids,
        "token_ids": c.token_ids,
        "text": c.text,
        "finish_reason": c.finish_reason,
        "timings": _timings(connect_s, c.timings, len(c.prompt_token_ids), len(c.token_ids)),
    }
    if params.logprobs is not None:
        out["logprobs"] = c.logprobs or []
    click.echo(json.dumps(out, ensure_ascii=False))


def _timings(connect_s: float, t: dict[str, float], n_prompt: int, n_gen: int) -> dict[str, float | None]:
    decode_s = t.get("decode_s", 0.0)
    return {
        "load_s": round(connect_s, 3),  # remote: connecting and the hello round trip
        "total_s": round(t.get("total_s", 0.0), 3),
        "queued_s": round(t.get("queued_s", 0.0), 4),
        "prefill_s": round(t.get("prefill_s", 0.0), 4),
        "decode_s": round(decode_s, 4),
        "prompt_tokens": n_prompt,
        "completion_tokens": n_gen,
        "decode_tokens_per_s": round((n_gen - 1) / decode_s, 2) if decode_s > 0 else None,
    }


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
