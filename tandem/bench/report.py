"""Plain-text tables of a `run_bench` result (the CLI echoes them; library code never prints)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["  " + ln.rstrip() for ln in lines]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _x(v: float) -> str:
    return "-" if v != v else f"{v:.2f}x"


def pipeline_lines(title: str, r: dict[str, Any]) -> list[str]:
    head = f"{title}: {r['model']}, {r['max_tokens']} tokens/request, {r['repeats']} runs per mode (medians)"
    out = [head]
    fwd = r.get("bare_decode_forward_ms")
    if fwd:
        steps = ", ".join(f"{k.replace('batch_', 'b')} {v:.2f} ms" for k, v in fwd.items() if k != "threads")
        out.append(f"  bare decode forward ({fwd['threads']} thread): {steps}")
    rows = []
    for b in r["batches"]:
        for mode in ("overlap", "sync"):
            m = b[mode]
            rows.append(
                [b["batch"], mode]
                + [
                    m[k]["median"]
                    for k in ("decode_tok_s", "e2e_tok_s", "ms_per_step", "ttft_ms", "worker_idle_ms")
                ]
            )
        for label, key in (("overlap/sync", "ratio_overlap_over_sync"), ("paired", "paired_ratio_median")):
            ratios = b.get(key)
            if ratios:
                cols = ("decode_tok_s", "e2e_tok_s", "ms_per_step", "ttft_ms")
                rows.append([b["batch"], label, *(_x(ratios.get(k, math.nan)) for k in cols), ""])
    out += table(["batch", "mode", "decode tok/s", "e2e tok/s", "ms/step", "TTFT ms", "worker idle ms"], rows)
    out.append("  overlap/sync: ratio of the medians; paired: median of each A/B pair's ratio")
    return out


def scheduler_lines(r: dict[str, Any]) -> list[str]:
    s = r["sizes"]
    mode = "overlap" if s["overlap"] else "sync"
    out = [
        f"Scheduler CPU per step: {s['num_seqs']} decoding sequences, {mode}, {s['steps']} steps "
        f"(target < {r['target_ms']} ms CPU)"
    ]
    rows = []
    for ph, v in r["phases"].items():
        rows.append(
            [ph, v["cpu_ms"]["median"], v["wall_ms"]["median"], v["wall_ms"]["min"], v["wall_ms"]["max"]]
        )
    out += table(["phase", "cpu ms (median)", "wall ms (median)", "wall min", "wall max"], rows)
    verdict = "meets" if r["meets_target"] else "MISSES"
    out.append(f"  {verdict} the target: {r['phases']['total']['cpu_ms']['median']:.3f} ms CPU per step")
    if r.get("hotspots"):
        out.append(f"  hotspots (cProfile over {s['profile_steps']} steps; profiler overhead inflates them):")
        out += table(
            ["function", "calls/step", "self us/step", "cum us/step"],
            [
                [h["function"], h["calls_per_step"], h["tottime_us_per_step"], h["cumtime_us_per_step"]]
                for h in r["hotspots"]
            ],
        )
    return out


def model_stack_lines(r: dict[str, Any]) -> list[str]:
    sz = r["sizes"]
    out = [f"Model stack (bare forward, fp32, no engine): {r['model_path']}"]
    load = r.get("load")
    if load:
        for kind in ("cold", "warm"):
            v = load[kind]
            out.append(
                f"  load {kind}: {v['total_s']:.2f} s (load_gguf {v['load_gguf_s']:.2f} s + "
                f"LlamaModel {v['build_model_s']:.2f} s), {load['threads']} thread"
            )
    rows = [
        [s["threads"], s["batch"], s["prefill_ms"], s["prefill_tok_s"], s["decode_ms"], s["decode_tok_s"]]
        for s in r["steps"]
    ]
    out += table(
        [
            "threads",
            "batch",
            f"prefill {sz['prefill_len']} ms",
            "prefill tok/s",
            "decode step ms",
            "decode tok/s",
        ],
        rows,
    )
    return out


def format_report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"tandem bench {m['date']}  torch {m['torch']}  python {m['python']}  {m['cpu_count']} CPUs  "
        f"load avg {m['load_avg_at_start'][0]:.2f}"
        if m.get("load_avg_at_start")
        else f"tandem bench {m['date']}  torch {m['torch']}",
        "",
    ]
    if "pipeline-tiny" in res:
        lines += [*pipeline_lines("Pipeline A/B (tiny model, ~1 ms steps)", res["pipeline-tiny"]), ""]
    if "pipeline-model" in res:
        lines += [*pipeline_lines("Pipeline A/B (default model)", res["pipeline-model"]), ""]
    if "scheduler" in res:
        lines += [*scheduler_lines(res["scheduler"]), ""]
    if "model-stack" in res:
        lines += [*model_stack_lines(res["model-stack"]), ""]
    if "structured" in res:
        from tandem.bench.structured import structured_lines

        lines += [*structured_lines(res["structured"]), ""]
    if "race" in res:
        from tandem.bench.race_report import race_lines

        lines += [*race_lines(res["race"]), ""]
    return "\n".join(lines).rstrip() + "\n"
