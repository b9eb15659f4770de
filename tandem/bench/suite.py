"""Run the benchmark sections and collect one JSON-ready dict (see benchmarks/README.md)."""

from __future__ import annotations

import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem import __version__
from tandem.formats.tiny import TinySpec, write_tiny_gguf

if TYPE_CHECKING:
    from tandem.bench.race import RaceOptions

log = logging.getLogger(__name__)

SECTIONS = ("pipeline-tiny", "pipeline-model", "scheduler", "model-stack", "structured", "race")
ALIASES = {"all": SECTIONS, "pipeline": ("pipeline-tiny", "pipeline-model")}
DEFAULT_MODEL = "smollm2:135m"
# Four layers of width 64 put the bare decode forward near 1 ms on one core of the reference
# machine (per-layer Python and kernel-launch overhead dominates at this size, not the FLOPs), so
# the scheduler's per-step cost is a visible fraction of a step.
TINY_SPEC = TinySpec(hidden=64, ffn=256, layers=4, heads=4, kv_heads=2, context=2048)


@dataclass(frozen=True)
class BenchOptions:
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False
    model: str | None = None  # the real model of pipeline-model / model-stack (default smollm2:135m)
    threads: int | None = None  # worker torch threads in the pipeline runs (None: the engine's default)
    race: RaceOptions | None = None  # the race section's options (None: its defaults, with model/threads)


def expand_sections(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Section names and aliases -> the sections in canonical order (unknown names raise)."""
    wanted: set[str] = set()
    for n in names or ("all",):
        if n in ALIASES:
            wanted.update(ALIASES[n])
        elif n in SECTIONS:
            wanted.add(n)
        else:
            raise ValueError(f"unknown section {n!r} (one of {', '.join((*SECTIONS, *ALIASES))})")
    return tuple(s for s in SECTIONS if s in wanted)


def engine_worker_threads(threads: int | None) -> int:
    """What the worker will use: ModelRunner leaves one core to the scheduler unless told."""
    return threads or max(1, (os.cpu_count() or 2) - 1)


def _git_dirs(git: Path) -> tuple[Path, Path]:
    """(the checkout's own git dir, the dir holding refs): one dir, or a worktree's two."""
    if not git.is_file():
        return git, git
    own = Path(git.read_text().strip().removeprefix("gitdir: "))
    common = own / (own / "commondir").read_text().strip() if (own / "commondir").exists() else own
    return own, common


def source_commit() -> str | None:
    """The checkout's HEAD commit, read from .git without running git (None outside a checkout)."""
    try:
        own, git = _git_dirs(Path(__file__).resolve().parents[2] / ".git")
        head = (own / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "tandem": __version__,
        "commit": source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
    }


def _sizes(quick: bool) -> dict[str, Any]:
    from tandem.bench.model_stack import StepSizes
    from tandem.bench.pipeline import PipelineSizes
    from tandem.bench.scheduler_cpu import SchedulerSizes

    if quick:
        return {
            "tiny": PipelineSizes(max_tokens=32, repeats=2),
            "model": PipelineSizes(max_tokens=16, repeats=1),
            "scheduler": SchedulerSizes(steps=60, warmup_steps=5, profile_steps=20),
            "stack": StepSizes(prefill_len=32, decode_steps=4, repeats=1),
        }
    return {
        "tiny": PipelineSizes(max_tokens=128, repeats=5),
        "model": PipelineSizes(max_tokens=64, repeats=3),
        "scheduler": SchedulerSizes(),
        "stack": StepSizes(),
    }


def _tiny_pipeline(tiny: Path, opts: BenchOptions, sizes: Any) -> dict[str, Any]:
    import torch

    from tandem.bench.model_stack import StepSizes, load_model, measure_steps
    from tandem.bench.pipeline import run_pipeline

    # The bare forward at the worker's thread count, measured before any engine runs beside it.
    nt = engine_worker_threads(opts.threads)
    before = torch.get_num_threads()
    torch.set_num_threads(nt)
    try:
        model, _, _ = load_model(tiny)
        step = StepSizes(prefill_len=16, decode_steps=50 if not opts.quick else 10, repeats=2)
        fwd = {f"batch_{b}": measure_steps(model, b, step)["decode_ms"] for b in sizes.batches}
    finally:
        torch.set_num_threads(before)
    out = run_pipeline(str(tiny), "tiny", sizes, threads=opts.threads, kv_cache_memory=64 * 2**20)
    out["tiny_spec"] = {k: (v.name if hasattr(v, "name") else v) for k, v in asdict(TINY_SPEC).items()}
    out["bare_decode_forward_ms"] = {"threads": nt, **fwd}
    return out


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every section asked for, in order; returns {"machine": ..., "<section>": {...}}."""
    say = progress or log.info
    sizes = _sizes(opts.quick)
    sections = expand_sections(opts.sections)
    results: dict[str, Any] = {"machine": machine_info(), "quick": opts.quick, "sections": list(sections)}
    model_path: str | None = None
    if {"pipeline-model", "model-stack", "structured"} & set(sections):
        from tandem.store.model_store import ensure_model

        ref = ensure_model(opts.model or DEFAULT_MODEL)
        model_path, results["model"] = str(ref.path), ref.name
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        tiny = write_tiny_gguf(Path(tmp) / "tiny.gguf", TINY_SPEC)
        for name in sections:
            say(f"bench: {name}...")
            t0 = time.perf_counter()
            if name == "pipeline-tiny":
                results[name] = _tiny_pipeline(tiny, opts, sizes["tiny"])
            elif name == "pipeline-model":
                from tandem.bench.pipeline import run_pipeline

                assert model_path is not None
                results[name] = run_pipeline(
                    model_path,
                    results["model"],
                    sizes["model"],
                    threads=opts.threads,
                    kv_cache_memory=128 * 2**20,
                )
            elif name == "scheduler":
                from tandem.bench.scheduler_cpu import run_scheduler_cpu

                results[name] = run_scheduler_cpu(tiny, sizes["scheduler"])
                results[name]["tokenizer"] = "tiny byte-level BPE (tandem.formats.tiny)"
            elif name == "structured":
                from tandem.bench.structured import StructuredSizes, run_structured

                assert model_path is not None
                st = StructuredSizes(max_tokens=16, repeats=1) if opts.quick else StructuredSizes()
                results[name] = run_structured(model_path, st, threads=opts.threads)
            elif name == "race":
                from tandem.bench.race import RaceOptions, run_race

                race = opts.race or RaceOptions(model=opts.model, threads=opts.threads)
                results[name] = run_race(race, say)
            elif name == "model-stack":
                from tandem.bench.model_stack import run_model_stack

                assert model_path is not None
                threads = (1, 2) if (os.cpu_count() or 1) >= 2 else (1,)
                results[name] = run_model_stack(model_path, threads=threads, sizes=sizes["stack"])
            if name.startswith("pipeline"):
                results[name]["worker_threads"] = engine_worker_threads(opts.threads)
            # Other jobs on a shared box show up here: read the figures against the load.
            results[name]["load_avg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
            results[name]["section_wall_s"] = time.perf_counter() - t0
            say(f"bench: {name} done in {time.perf_counter() - t0:.1f} s")
    return results
