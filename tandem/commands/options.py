"""Click options shared by the commands that start an engine (generate, serve, bench)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import click

from tandem.config import EngineConfig

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    value = float(m.group(1)) if m else 0.0
    if not m or unit not in _UNITS or value <= 0:
        raise click.BadParameter(f"not a size: {text!r} (use e.g. 512M, 2G)")
    return int(value * _UNITS[unit])


class ByteSize(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(value)
        except click.BadParameter as e:
            self.fail(e.message, param, ctx)


def _default(name: str) -> Any:
    """The dataclass's default, so the CLI never restates one."""
    return EngineConfig.__dataclass_fields__[name].default


def _option(name: str, *decls: str, **kw: Any) -> tuple[str, Callable[..., Any]]:
    """An option whose value lands in the EngineConfig field ``name``, defaulting to its default."""
    return name, click.option(
        *(decls or (f"--{name.replace('_', '-')}",)), name, default=_default(name), **kw
    )


_ENGINE_OPTIONS = [
    _option("device", show_default=True, help="cpu, cuda or cuda:N."),
    _option(
        "dtype",
        show_default=True,
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        help="auto: on a CPU, quantized GGUF weights stay packed (int4 kernels) and compute is bf16 "
        "where the CPU has it; float32: the exact reference path.",
    ),
    _option(
        "kv_cache_memory",
        type=ByteSize(),
        show_default=f"{_default('kv_cache_memory') // 2**20}M",
        help="Memory for the paged KV cache (e.g. 512M, 4G).",
    ),
    _option("max_num_seqs", show_default=True, type=click.IntRange(1), help="Most sequences in one step."),
    _option(
        "max_num_batched_tokens",
        show_default=True,
        type=click.IntRange(1),
        help="Most tokens in one step (prefill chunk budget).",
    ),
    _option(
        "max_queue",
        show_default=True,
        type=click.IntRange(1),
        help="Requests waiting beyond this are refused as busy.",
    ),
    _option(
        "context_length",
        "--num-ctx",
        type=click.IntRange(2),
        help="Context length (default: the model's).",
    ),
    _option(
        "overlap",
        "--overlap/--no-overlap",
        show_default=True,
        help="Prepare the next step while the worker runs this one (--no-overlap: wait for each).",
    ),
    _option("threads", type=click.IntRange(1), help="CPU threads of the worker."),
    _option(
        "enforce_eager",
        is_flag=True,
        help="GPU: run decode steps eagerly instead of replaying CUDA graphs (the CPU never uses graphs).",
    ),
    _option(
        "step_timeout",
        type=click.FloatRange(0, min_open=True),
        show_default=True,
        help="Seconds a step may run past its expected duration (measured) before the worker "
        "counts as hung and is restarted.",
    ),
    # Test hook: makes the worker misbehave on purpose (the fault tests), never for users.
    _option("inject_fault", hidden=True),
]
ENGINE_OPTION_FIELDS = tuple(name for name, _ in _ENGINE_OPTIONS)


def engine_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for _, opt in reversed(_ENGINE_OPTIONS):
        fn = opt(fn)
    return fn


def engine_config(model_path: str, model_name: str, kw: dict[str, Any], **extra: Any) -> EngineConfig:
    """The one way a command builds its EngineConfig: engine_options' values (picked out of the
    command's keyword arguments by field name), the model, the log level, and ``extra`` fields
    a command sets from options of its own (serve's --trace-steps)."""
    options = {name: kw[name] for name in ENGINE_OPTION_FIELDS}
    return EngineConfig(
        model_path=model_path, model_name=model_name, log_level=current_log_level(), **options, **extra
    )


def current_log_level() -> int:
    return logging.getLogger().getEffectiveLevel()
