"""What one run of one race mode measured, and how runs are summarized (shared by every mode)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tandem.bench.timing import median, ratio

# The fields of every run in the race's JSON, in order (null where a mode cannot tell).
RUN_FIELDS = (
    "tokens_per_s",
    "ttft_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "sched_ms_per_step",
    "worker_ms_per_step",
    "gpu_idle_frac",
)


class BenchError(RuntimeError):
    """A mode could not run (a server that did not start, a reply that is not what was asked)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class RunSample:
    """One batch of requests through one mode: every request sent at once, all of them finished."""

    batch_size: int
    tokens: int  # generated, all requests together
    wall_s: float  # first request sent -> last request finished
    ttft_ms: list[float]  # per request: sent -> first generated text
    itl_ms: list[float]  # every gap between two consecutive pieces of generated text of a request
    # From the engine's own step timings, where the mode has them (tandem's step trace).
    steps: int | None = None
    sched_ms_per_step: float | None = None
    worker_ms_per_step: float | None = None
    gpu_idle_frac: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return ratio(self.tokens, self.wall_s)

    def metrics(self) -> dict[str, float | None]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "ttft_ms": median(self.ttft_ms),
            "itl_p50_ms": percentile(self.itl_ms, 50),
            "itl_p99_ms": percentile(self.itl_ms, 99),
            "sched_ms_per_step": self.sched_ms_per_step,
            "worker_ms_per_step": self.worker_ms_per_step,
            "gpu_idle_frac": self.gpu_idle_frac,
        }

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("ttft_ms", "itl_ms")}
        return {**d, **self.metrics()}


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return median(known) if known else None


def summarize_runs(mode: str, batch_size: int, samples: list[RunSample]) -> dict[str, Any]:
    """The race's entry for one (mode, batch size): the median over repeats of each field."""
    per_run = [s.metrics() for s in samples]
    out: dict[str, Any] = {"mode": mode, "batch_size": batch_size}
    out.update({k: _median_or_none([m[k] for m in per_run]) for k in RUN_FIELDS})
    out["repeats"] = len(samples)
    out["samples"] = [s.as_dict() for s in samples]
    return out
