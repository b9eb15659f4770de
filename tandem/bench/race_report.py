"""The race's table: per batch size every mode's figures, then the ratios side by side."""

from __future__ import annotations

from typing import Any

from tandem.bench.report import table

_COLUMNS = (
    ("tok/s", "tokens_per_s"),
    ("TTFT ms", "ttft_ms"),
    ("ITL p50 ms", "itl_p50_ms"),
    ("ITL p99 ms", "itl_p99_ms"),
    ("sched ms/step", "sched_ms_per_step"),
    ("worker ms/step", "worker_ms_per_step"),
    ("idle frac", "gpu_idle_frac"),
)
_RATIOS = ("tandem/llama.cpp", "tandem/hf", "overlap/sync")


def _v(x: Any) -> Any:
    return float("nan") if x is None else x


def _x(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}x"


def race_lines(doc: dict[str, Any]) -> list[str]:
    s, m = doc["settings"], doc["model"]
    out = [
        f"Race: {m['name']}, {s['prompt_len']}-token prompts + {s['gen_len']} generated, context "
        f"{s['context_len']}, {s['repeats']} runs per mode (medians), device {s['device']}, tandem "
        f"worker threads {s['tandem_worker_threads']}, hf/llama.cpp threads {s['baseline_threads']}"
    ]
    rows = [[r["batch_size"], r["mode"], *(_v(r[k]) for _, k in _COLUMNS)] for r in doc["runs"]]
    out += table(["batch", "mode", *(h for h, _ in _COLUMNS)], rows)
    out.append("")
    ratio_rows = [[r["batch_size"], *(_x(r[k]) for k in _RATIOS)] for r in doc["ratios"]]
    out += table(["batch", *_RATIOS], ratio_rows)
    out.append(
        "  tokens/s ratios of the medians; tandem = overlap (its default), or sync when overlap did not run"
    )
    return out
