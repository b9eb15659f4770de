"""Click options shared by the commands that start an engine (generate, serve, bench)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import click

from tandem.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig

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


def engine_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--device", default=EngineConfig.device, show_default=True, help="cpu, cuda or cuda:N."),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            help="auto: on a CPU, quantized GGUF weights stay packed (int4 kernels) and compute is bf16 "
            "where the CPU has it; float32: the exact reference path.",
        ),
        click.option(
            "--kv-cache-memory",
            default=f"{DEFAULT_KV_CACHE_MEMORY // 2**20}M",
            show_default=True,
            help="Memory for the paged KV cache (e.g. 512M, 4G).",
        ),
        click.option(
            "--max-num-seqs",
            default=EngineConfig.max_num_seqs,
            show_default=True,
            type=click.IntRange(1),
            help="Most sequences in one step.",
        ),
        click.option(
            "--max-num-batched-tokens",
            default=EngineConfig.max_num_batched_tokens,
            show_default=True,
            type=click.IntRange(1),
            help="Most tokens in one step (prefill chunk budget).",
        ),
        click.option(
            "--max-queue",
            default=EngineConfig.max_queue,
            show_default=True,
            type=click.IntRange(1),
            help="Requests waiting beyond this are refused as busy.",
        ),
        click.option(
            "--num-ctx",
            "context_length",
            type=click.IntRange(2),
            default=None,
            help="Context length (default: the model's).",
        ),
        click.option("--no-overlap", is_flag=True, help="Wait for each step before preparing the next."),
        click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads of the worker."),
        click.option(
            "--enforce-eager",
            is_flag=True,
            help="GPU: run decode steps eagerly instead of replaying CUDA graphs (the CPU never "
            "uses graphs).",
        ),
        click.option(
            "--step-timeout",
            type=click.FloatRange(0, min_open=True),
            default=EngineConfig.step_timeout,
            show_default=True,
            help="Seconds a step may run past its expected duration (measured) before the worker "
            "counts as hung and is restarted.",
        ),
        # Test hook: makes the worker misbehave on purpose (the fault tests), never for users.
        click.option("--inject-fault", default="", hidden=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def engine_config(model_path: str, model_name: str, kw: dict[str, Any], log_level: int) -> EngineConfig:
    return EngineConfig(
        model_path=model_path,
        model_name=model_name,
        device=kw["device"],
        dtype=kw["dtype"],
        kv_cache_memory=parse_bytes(kw["kv_cache_memory"]),
        max_num_seqs=kw["max_num_seqs"],
        max_num_batched_tokens=kw["max_num_batched_tokens"],
        max_queue=kw["max_queue"],
        context_length=kw["context_length"],
        overlap=not kw["no_overlap"],
        threads=kw["threads"],
        enforce_eager=kw["enforce_eager"],
        step_timeout=kw["step_timeout"],
        inject_fault=kw["inject_fault"],
        log_level=log_level,
    )


def current_log_level() -> int:
    return logging.getLogger().getEffectiveLevel()
