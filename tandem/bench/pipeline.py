"""End-to-end A/B: the two-process engine with overlapped steps against the same engine in sync mode.

Both engines stay up for the whole comparison and runs alternate A B A B, so drift on a shared
machine (other jobs, thermal state) lands on both sides instead of on whichever ran second.
A client here drives the engine's sockets directly, as the gateway does, with every request of a
batch submitted at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from tandem.bench.timing import median, ratio, summarize
from tandem.config import EngineConfig
from tandem.engine.process import EngineProcess
from tandem.engine.router import EngineError
from tandem.engine.sync import SyncEngine
from tandem.messages import ErrorCode, RequestError, SamplingParams, TokenDelta

log = logging.getLogger(__name__)

MODES = ("overlap", "sync")
_IDLE_MIN_STEPS = 100
_RATIO_KEYS = ("decode_tok_s", "e2e_tok_s", "ms_per_step", "ttft_ms")
_PROMPT = "The quick brown fox jumps over the lazy dog while the sea rolls on."


@dataclass(frozen=True)
class PipelineSizes:
    batches: tuple[int, ...] = (1, 8)
    max_tokens: int = 128  # generated per request (ignore_eos: exactly this many)
    repeats: int = 5  # measured runs per mode and batch, after one warm-up run
    run_timeout_s: float = 300.0


@dataclass
class RunResult:
    batch: int
    tokens: int
    wall_s: float  # first submit -> last Finished, as the client sees it
    ttft_s: float  # first submit -> every request has its first token
    decode_tokens: int  # tokens that arrived after every request had its first one
    decode_s: float
    steps: int  # scheduler steps the run took (from its Stats)
    worker_idle_ms: float  # the scheduler's moving average of worker idle time per step

    @property
    def e2e_tok_s(self) -> float:
        return ratio(self.tokens, self.wall_s)

    @property
    def decode_tok_s(self) -> float:
        return ratio(self.decode_tokens, self.decode_s)

    @property
    def ms_per_step(self) -> float:
        return ratio(self.wall_s * 1000, self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "ttft_ms": self.ttft_s * 1000,
            "e2e_tok_s": self.e2e_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "steps": self.steps,
            "ms_per_step": self.ms_per_step,
            "worker_idle_ms": self.worker_idle_ms,
        }


def prompts_for_run(engine: EngineProcess, run_id: int, batch: int) -> list[list[int]]:
    """Distinct leading text per run and request, so no run is served from another's prefix cache."""
    assert engine.tokenizer is not None
    return [engine.tokenizer.encode(f"[{run_id}.{i}] {_PROMPT}") for i in range(batch)]


def run_batch(
    engine: EngineProcess, prompts: list[list[int]], max_tokens: int, timeout_s: float
) -> RunResult:
    """Submit every prompt at once and read outputs until each request has its Finished."""
    client = SyncEngine(engine)
    steps_before = client.stats().steps
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    arrivals: list[tuple[float, int]] = []  # (time, tokens) of every delta
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    t0 = time.perf_counter()
    rids = [client.submit(ids, params) for ids in prompts]
    while len(done) < len(rids):
        if time.perf_counter() - t0 > timeout_s:
            raise EngineError(ErrorCode.TIMEOUT, f"benchmark run did not finish within {timeout_s} s")
        events = client.next_events(0.25)
        now = time.perf_counter()
        for rid, ev in events:
            if isinstance(ev, RequestError):
                raise EngineError.of(ev)
            if isinstance(ev, TokenDelta):
                first.setdefault(rid, now)
                arrivals.append((now, len(ev.token_ids)))
            else:
                done[rid] = now
    t_first, t_last = max(first.values()), max(done.values())
    stats = client.stats()
    return RunResult(
        batch=len(prompts),
        tokens=sum(n for _, n in arrivals),
        wall_s=t_last - t0,
        ttft_s=t_first - t0,
        decode_tokens=sum(n for t, n in arrivals if t > t_first),
        decode_s=t_last - t_first,
        steps=stats.steps - steps_before,
        # The scheduler's moving average (weight 0.1 per step) still remembers the idle gap
        # before the run; after 100 steps that memory is under 0.003% of it.
        worker_idle_ms=stats.gpu_idle_ms_avg if stats.steps - steps_before >= _IDLE_MIN_STEPS else math.nan,
    )


@contextmanager
def engine_pair(base: EngineConfig) -> Iterator[dict[str, EngineProcess]]:
    """An overlap engine and a sync engine, identical otherwise, both up until the block ends."""
    with ExitStack() as stack:
        engines = {}
        for mode in MODES:
            cfg = EngineConfig(**{**base.__dict__, "overlap": mode == "overlap", "runtime_dir": None})
            t0 = time.perf_counter()
            engines[mode] = stack.enter_context(EngineProcess(cfg))
            log.info("%s engine ready in %.2f s", mode, time.perf_counter() - t0)
        yield engines


def _mode_summary(runs: list[RunResult]) -> dict[str, Any]:
    keys = ("decode_tok_s", "e2e_tok_s", "ms_per_step", "ttft_ms", "worker_idle_ms")
    dicts = [r.as_dict() for r in runs]
    return {k: summarize([d[k] for d in dicts]) for k in keys}


def compare(base: EngineConfig, sizes: PipelineSizes) -> list[dict[str, Any]]:
    """Per batch size: medians per mode, the overlap/sync ratios and every run in order."""
    out = []
    with engine_pair(base) as engines:
        run_id = 0
        for batch in sizes.batches:
            runs: dict[str, list[RunResult]] = {m: [] for m in MODES}
            order: list[dict[str, Any]] = []
            for rep in range(sizes.repeats + 1):  # rep 0 warms both engines up and is not counted
                for mode in MODES:
                    run_id += 1
                    eng = engines[mode]
                    res = run_batch(
                        eng, prompts_for_run(eng, run_id, batch), sizes.max_tokens, sizes.run_timeout_s
                    )
                    log.info("batch %d %s rep %d: %.1f tok/s decode", batch, mode, rep, res.decode_tok_s)
                    if rep:
                        runs[mode].append(res)
                        order.append({"mode": mode, **res.as_dict()})
            summary = {m: _mode_summary(runs[m]) for m in MODES}
            out.append(
                {
                    "batch": batch,
                    **summary,
                    "ratio_overlap_over_sync": {
                        k: ratio(summary["overlap"][k]["median"], summary["sync"][k]["median"])
                        for k in _RATIO_KEYS
                    },
                    # Each overlap run against the sync run right after it, then the median: drift
                    # slower than one A/B pair cancels out.
                    "paired_ratio_median": {
                        k: median(
                            [
                                ratio(a.as_dict()[k], b.as_dict()[k])
                                for a, b in zip(runs["overlap"], runs["sync"], strict=True)
                            ]
                        )
                        for k in _RATIO_KEYS
                    },
                    "runs": order,
                }
            )
    return out


def run_pipeline(
    model_path: str, model_name: str, sizes: PipelineSizes, threads: int | None = None, **engine_kw: Any
) -> dict[str, Any]:
    base = EngineConfig(
        model_path=model_path,
        model_name=model_name,
        max_num_seqs=max(8, *sizes.batches),
        threads=threads,
        log_level=logging.WARNING,
        **engine_kw,
    )
    t0 = time.perf_counter()
    results = compare(base, sizes)
    return {
        "model": model_name,
        "model_path": model_path,
        "max_tokens": sizes.max_tokens,
        "repeats": sizes.repeats,
        "worker_threads": threads,
        "kv_cache_memory": base.kv_cache_memory,
        "wall_s": time.perf_counter() - t0,
        "batches": results,
    }
