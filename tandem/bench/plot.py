"""`--plot FILE.png`: the race's tokens/s against batch size, one line per mode (matplotlib, the
`bench` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_race(doc: dict[str, Any], path: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'tandem-llm[bench]'") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for mode in doc["settings"]["modes"]:
            runs = sorted((r for r in doc["runs"] if r["mode"] == mode), key=lambda r: r["batch_size"])
            xs = [r["batch_size"] for r in runs if r["tokens_per_s"] is not None]
            ys = [r["tokens_per_s"] for r in runs if r["tokens_per_s"] is not None]
            ax.plot(xs, ys, marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["settings"]["batch_sizes"], [str(b) for b in doc["settings"]["batch_sizes"]])
        ax.set_xlabel("batch size (concurrent requests)")
        ax.set_ylabel("generated tokens/s")
        m, s = doc["machine"], doc["settings"]
        where = m.get("gpu") or f"{m.get('cpu_model', '')} x{m.get('cores', '?')}"
        ax.set_title(
            f"{doc['model']['name']}: {s['prompt_len']}+{s['gen_len']} tokens, {s['device']}, {where}",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        ax.legend()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
