"""The scheduler's CPU cost per step, in process, with no worker.

It drives the scheduler's own pure core (`EngineCore.add`, `launch`, `apply`), which has no
sockets, worker or actor context: a real ring slot is packed every step, the doorbell is encoded
and dropped, and a fake StepResult (random ids of real text, through the real tokenizer's
detokenizer) goes through the msgpack codec and is applied. The scheduler process runs the same
calls, so the number follows the code as it changes.
"""

from __future__ import annotations

import cProfile
import logging
import math
import pstats
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.timing import median, summarize
from tandem.config import EngineConfig
from tandem.messages import OutputBatch, SamplingParams, StepResult, SubmitRequest, decode, encode
from tandem.scheduler.core import EngineCore
from tandem.shm import RingSegment, batch_layout
from tandem.tokenizer.model_files import load_tokenizer
from tandem.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PHASES = ("schedule", "pack", "results", "total")
_TEXT = "Shared memory rings carry each step's batch from the scheduler to the worker process. " * 4


@dataclass(frozen=True)
class SchedulerSizes:
    num_seqs: int = 256
    prompt_len: int = 64
    steps: int = 300  # measured decode steps
    warmup_steps: int = 20  # decode steps after every prompt is in, not measured
    max_num_batched_tokens: int = 512  # the engine default: prompts go in as chunked prefill
    block_size: int = 16
    overlap: bool = True
    profile_steps: int = 100


def _max_steps(s: SchedulerSizes) -> int:
    """Steps any sequence can live through: nothing may finish while it is being measured."""
    prefill = math.ceil(s.num_seqs * s.prompt_len / s.max_num_batched_tokens)
    return prefill + s.warmup_steps + s.steps + s.profile_steps + 32


def _context_length(s: SchedulerSizes) -> int:
    return s.prompt_len + _max_steps(s) + 16


def _core(tokenizer_path: str | Path, s: SchedulerSizes, ring: RingSegment) -> EngineCore:
    ctx_len = _context_length(s)
    cfg = EngineConfig(
        model_path=str(tokenizer_path),
        max_num_seqs=s.num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        max_queue=max(512, s.num_seqs),
        block_size=s.block_size,
        overlap=s.overlap,
    )
    blocks = s.num_seqs * math.ceil(ctx_len / s.block_size) + 64
    return EngineCore(cfg, load_tokenizer(str(tokenizer_path)), ctx_len, ring, blocks)


class _Driver:
    """Steps the core as the scheduler process does: launch, then apply the oldest result when full."""

    def __init__(self, core: EngineCore, tokenizer: Tokenizer, seed: int = 0) -> None:
        self.core = core
        self.rng = np.random.default_rng(seed)
        self.pool = np.array(tokenizer.encode(_TEXT), dtype=np.int64)  # ids of real text
        self.slots: deque[int] = deque()  # slot of each in-flight step, oldest first
        self.sched_s = [0.0, 0.0]  # (wall, cpu) spent in Scheduler.schedule by the last launch
        real_schedule = core.sched.schedule

        def timed_schedule(step: int) -> Any:
            w, c = time.perf_counter(), time.process_time()
            out = real_schedule(step)
            self.sched_s = [time.perf_counter() - w, time.process_time() - c]
            return out

        core.sched.schedule = timed_schedule  # type: ignore[method-assign]
        self.max_inflight = 2 if core.cfg.overlap else 1

    def _fake_result(self) -> bytes:
        batch = self.core.inflight[0].batch
        n = sum(1 for it in batch.items if it.sample)
        ids = self.rng.choice(self.pool, size=n)
        res = StepResult(batch.step, self.slots[0], n, ids.tobytes(), b"", forward_ms=1.0)
        return encode(res)  # the worker's side: not timed

    def step(self) -> dict[str, tuple[float, float]] | None:
        """One loop iteration; (wall s, cpu s) per phase, or None if nothing was launched."""
        core = self.core
        next_slot = core.free_slots[0] if core.free_slots else -1
        w0, c0 = time.perf_counter(), time.process_time()
        bell = core.launch()
        if bell is not None:
            encode(bell)  # what goes on the doorbell socket
        launched = bell is not None
        w1, c1 = time.perf_counter(), time.process_time()
        if launched:
            self.slots.append(next_slot)
        sched = tuple(self.sched_s) if launched else (0.0, 0.0)
        self.sched_s = [0.0, 0.0]
        results = (0.0, 0.0)
        if core.inflight and (len(core.inflight) >= self.max_inflight or not launched):
            frame = self._fake_result()
            w2, c2 = time.perf_counter(), time.process_time()
            encode(core.apply(decode(frame)))  # and what goes to the gateway
            results = (time.perf_counter() - w2, time.process_time() - c2)
            self.slots.popleft()
        if not launched:
            return None
        launch = (w1 - w0, c1 - c0)
        pack = (launch[0] - sched[0], launch[1] - sched[1])
        total = (launch[0] + results[0], launch[1] + results[1])
        return {"schedule": sched, "pack": pack, "results": results, "total": total}


def _admit_all(core: EngineCore, tokenizer: Tokenizer, s: SchedulerSizes) -> None:
    params = SamplingParams(max_tokens=_max_steps(s), ignore_eos=True)
    text_ids = tokenizer.encode(_TEXT * 4)
    out = OutputBatch()
    for i in range(s.num_seqs):
        # A distinct first token per sequence: no two prompts share a cached prefix block.
        ids = [3 + i % 200, *text_ids[i % 32 : i % 32 + s.prompt_len - 1]]
        core.add(SubmitRequest(f"bench-{i}", ids, params, time.monotonic()), out)
    if out.errors:
        raise RuntimeError(f"admission failed: {out.errors[0].message}")


def _profile(driver: _Driver, steps: int, top: int = 15) -> list[dict[str, Any]]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        driver.step()
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_cc, ncalls, tottime, cumtime, _) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({fn})",
                "calls_per_step": ncalls / steps,
                "tottime_us_per_step": tottime / steps * 1e6,
                "cumtime_us_per_step": cumtime / steps * 1e6,
            }
        )
    rows.sort(key=lambda r: r["tottime_us_per_step"], reverse=True)
    return rows[:top]


def run_scheduler_cpu(
    tokenizer_path: str | Path,
    sizes: SchedulerSizes | None = None,
    target_ms: float = 1.0,
    profile: bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-step CPU time of the scheduler at `num_seqs` decoding sequences.

    `profile`: None profiles only when the median total misses `target_ms`.
    """
    s = sizes or SchedulerSizes()
    ctx_len = _context_length(s)
    layout = batch_layout(s.max_num_batched_tokens, s.num_seqs, math.ceil(ctx_len / s.block_size), 2)
    with RingSegment.create(layout, prefix="tandembench") as ring:
        core = _core(tokenizer_path, s, ring)
        tokenizer = load_tokenizer(str(tokenizer_path))
        driver = _Driver(core, tokenizer)
        _admit_all(core, tokenizer, s)
        # Chunked prefill until every sequence is decoding, then the warm-up steps.
        prefill_steps = 0
        while any(len(q.token_ids) == q.prompt_len for q in core.sched.running) or core.sched.waiting:
            driver.step()
            prefill_steps += 1
        for _ in range(s.warmup_steps):
            driver.step()
        samples = [r for r in (driver.step() for _ in range(s.steps)) if r is not None]
        batch_sizes = {len(f.batch.items) for f in core.inflight}
        hot = None
        total_ms = median([r["total"][0] for r in samples]) * 1000
        if profile or (profile is None and total_ms > target_ms):
            hot = _profile(driver, s.profile_steps)
    phases = {
        ph: {
            "wall_ms": summarize([r[ph][0] * 1000 for r in samples]),
            "cpu_ms": summarize([r[ph][1] * 1000 for r in samples]),
        }
        for ph in PHASES
    }
    return {
        "sizes": s.__dict__,
        "tokenizer": str(tokenizer_path),
        "prefill_steps": prefill_steps,
        "decode_batch": sorted(batch_sizes),
        "phases": phases,
        "target_ms": target_ms,
        "meets_target": phases["total"]["cpu_ms"]["median"] <= target_ms,
        "hotspots": hot,
    }
