"""Engine settings: one dataclass, built from CLI options (or the Python API); no env reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_KV_CACHE_MEMORY = 512 * 2**20


@dataclass
class EngineConfig:
    model_path: str  # a .gguf file or a safetensors folder (resolved by the model store)
    model_name: str = ""
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    # "auto" (CPU: quantized GGUF weights kept packed, bf16 compute where the CPU has AVX-512 BF16
    # or AMX, else fp32; GPU: bf16) | "float32" (the exact reference path) | "bfloat16" | "float16"
    dtype: str = "auto"
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY  # bytes for the paged KV pool
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_queue: int = 512
    context_length: int | None = None  # None: the model's own
    overlap: bool = True
    ring_depth: int = 2
    enable_prefix_caching: bool = True
    # Seconds a step may run past its expected duration before the worker counts as hung
    # (scheduler/watchdog.py derives the expected duration from measured step times).
    step_timeout: float = 10.0
    # The worker is restarted after each death, until it dies this often within the window.
    max_worker_deaths: int = 3
    worker_death_window: float = 60.0
    threads: int | None = None  # torch intra-op threads in the worker (CPU)
    # GPU only: run decode steps eagerly instead of replaying captured CUDA graphs (never used on CPU).
    enforce_eager: bool = False
    trace_steps: int = 0  # keep the timings of the last N steps for TraceRequest (0: off)
    inject_fault: str = ""  # test hook for the fault tests: see gpu_worker/faults.py
    log_level: int = logging.WARNING
    runtime_dir: Path | None = None  # set by whoever starts the engine

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue", "kv_cache_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {self.step_timeout}")
        if self.max_worker_deaths < 1:
            raise ValueError(f"max_worker_deaths must be >= 1, got {self.max_worker_deaths}")
        if self.ring_depth < 2:
            raise ValueError(f"ring_depth must be >= 2, got {self.ring_depth}")
        if self.trace_steps < 0:
            raise ValueError(f"trace_steps must be >= 0, got {self.trace_steps}")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")


@dataclass
class WorkerConfig:
    """What the scheduler hands the worker it spawns: the engine's settings, plus what only the
    worker needs (pickled across the spawn, so plain data only)."""

    engine: EngineConfig
    context_length: int  # resolved: engine.context_length capped at the model's own
    ring: dict[str, Any]  # RingSegment.handle()
    doorbell_endpoint: str
    results_endpoint: str
