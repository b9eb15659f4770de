"""Model-stack figures: load time, and prefill / decode step times of the bare forward.

No scheduler, no ring, no second process: just `load_gguf` + `LlamaModel` and the paged forward
the worker runs, so these numbers are the floor the pipeline adds its costs to.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tandem.bench.timing import median
from tandem.formats.loader import load_gguf
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.architectures import make_model
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.llama import LlamaModel

log = logging.getLogger(__name__)

BLOCK_SIZE = 16


@dataclass(frozen=True)
class StepSizes:
    prefill_len: int = 128
    decode_steps: int = 16  # decode steps timed after the prefill (median reported)
    repeats: int = 3  # prefills timed (each on fresh positions of the KV pool)


def load_model(path: str | Path) -> tuple[LlamaModel, float, float]:
    """(model, seconds in load_gguf, seconds building LlamaModel)."""
    t0 = time.perf_counter()
    loaded = load_gguf(path, dtype=torch.float32)
    t1 = time.perf_counter()
    model = make_model(loaded.config, loaded.tensors)
    return model, t1 - t0, time.perf_counter() - t1


def measure_load(path: str | Path, warm_repeats: int = 2) -> dict[str, Any]:
    """Cold = the first load in this process (page cache as found: a truly cold disk needs root).

    Warm = the median of the loads after it, with dequant code, allocator and page cache warm.
    """
    loads = []
    for _ in range(1 + warm_repeats):
        model, gguf_s, build_s = load_model(path)
        loads.append((gguf_s, build_s))
        del model
        gc.collect()
    cold, warm = loads[0], loads[1:]
    return {
        "cold": {"load_gguf_s": cold[0], "build_model_s": cold[1], "total_s": sum(cold)},
        "warm": {
            "load_gguf_s": median([w[0] for w in warm]),
            "build_model_s": median([w[1] for w in warm]),
            "total_s": median([sum(w) for w in warm]),
        },
    }


class _Batch:
    """`batch` sequences, each owning a contiguous run of KV blocks, stepped through the forward."""

    def __init__(self, model: LlamaModel, batch: int, max_len: int) -> None:
        self.model = model
        self.batch = batch
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        self.kv = KVCache.allocate(model.config, batch * blocks_per_seq, BLOCK_SIZE, model.cache_dtype)
        self.tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32).reshape(batch, blocks_per_seq)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, start: int, n: int) -> float:
        """Feed tokens [start, start + n) of every sequence; wall ms of metadata + forward."""
        b, vocab = self.batch, self.model.config.vocab_size
        ids = torch.randint(0, vocab, (b * n,), generator=self.gen)
        positions = torch.arange(start, start + n).repeat(b)
        rows = torch.arange(1, b + 1) * n - 1  # the last token of each sequence gets logits
        t0 = time.perf_counter()
        meta = AttentionMetadata.build(
            positions,
            [n] * b,
            [start + n] * b,
            self.tables,
            BLOCK_SIZE,
            sliding_window=self.model.config.sliding_window,
        )
        logits = self.model(ids, positions, self.kv, meta, rows)
        logits.argmax(dim=-1)  # greedy sampling, as the worker's all-greedy fast path does
        return (time.perf_counter() - t0) * 1000


class _StepTimes:
    """Prefill and decode samples of one (threads, batch) point, gathered a repeat at a time."""

    def __init__(self, model: LlamaModel, batch: int, sizes: StepSizes) -> None:
        self.batch, self.sizes = batch, sizes
        self.runner = _Batch(model, batch, sizes.prefill_len + sizes.decode_steps)
        self.prefill: list[float] = []
        self.decode: list[float] = []

    def warm_up(self) -> None:
        self.runner.step(0, min(8, self.sizes.prefill_len))  # first call allocates and picks kernels

    def repeat(self) -> None:
        p = self.sizes.prefill_len
        self.prefill.append(self.runner.step(0, p))
        self.decode += [self.runner.step(p + k, 1) for k in range(self.sizes.decode_steps)]

    def summary(self) -> dict[str, float]:
        pre, dec = median(self.prefill), median(self.decode)
        return {
            "prefill_ms": pre,
            "prefill_tok_s": self.batch * self.sizes.prefill_len / (pre / 1000),
            "decode_ms": dec,
            "decode_tok_s": self.batch / (dec / 1000),
        }


def measure_steps(model: LlamaModel, batch: int, sizes: StepSizes) -> dict[str, float]:
    """Median prefill (all `batch` prompts in one step) and decode step times in ms."""
    t = _StepTimes(model, batch, sizes)
    t.warm_up()
    for _ in range(sizes.repeats):
        t.repeat()
    return t.summary()


def run_model_stack(
    path: str | Path,
    batches: tuple[int, ...] = (1, 8),
    threads: tuple[int, ...] = (1, 2),
    sizes: StepSizes | None = None,
    measure_loading: bool = True,
) -> dict[str, Any]:
    """Load times, then step times per (threads, batch), the points interleaved repeat by repeat
    so that load from other jobs on a shared machine spreads over all of them."""
    sizes = sizes or StepSizes()
    before = torch.get_num_threads()
    out: dict[str, Any] = {"model_path": str(path), "sizes": sizes.__dict__, "steps": []}
    try:
        torch.set_num_threads(threads[0])
        if measure_loading:
            out["load"] = measure_load(path)
            out["load"]["threads"] = threads[0]
        model, _, _ = load_model(path)
        points = {(nt, b): _StepTimes(model, b, sizes) for nt in threads for b in batches}
        for rep in range(-1, sizes.repeats):  # -1: warm-up
            for (nt, b), t in points.items():
                torch.set_num_threads(nt)
                log.info("model stack: %d thread(s), batch %d, repeat %d", nt, b, rep)
                if rep < 0:
                    t.warm_up()
                else:
                    t.repeat()
        out["steps"] = [{"threads": nt, "batch": b, **t.summary()} for (nt, b), t in points.items()]
    finally:
        torch.set_num_threads(before)
    return out
