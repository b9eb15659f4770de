"""Small statistics and timing helpers shared by the benchmark sections."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or missing (a ratio of nothing is not 0 or inf)."""
    return a / b if b else float("nan")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median plus spread: on a shared 2-core box the spread says how far to trust the median."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": median(values), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def time_call(fn: Callable[[], T]) -> tuple[T, float]:
    """Run fn once; return its result and the wall seconds it took."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def round_floats(obj: Any, digits: int = 4) -> Any:
    """Round every float in a nested structure: JSON results stay readable and diffable."""
    if isinstance(obj, float):
        return round(obj, digits) if obj == obj else None  # NaN is not JSON
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, digits) for v in obj]
    return obj
