"""Decode-step benchmark: ops per layer, context scaling, batch-256 planning, eager vs CUDA graphs.

    python benchmarks/bench_decode.py                                  # default model, CPU
    python benchmarks/bench_decode.py --quick                          # smoke check (tiny shape)
    python benchmarks/bench_decode.py --device cuda --synthetic smollm2-135m --json-out r.json --plot r.png

The logic lives in tandem/bench/decode_step.py; see README.md here for what the figures mean.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from tandem.bench import decode_step as ds
from tandem.bench.suite import machine_info
from tandem.bench.timing import round_floats
from tandem.gpu_worker.runner import resolve_dtype


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2:135m", help="a model of the store or a .gguf path")
    p.add_argument("--synthetic", choices=sorted(ds.SHAPES), help="random weights of this shape instead")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batches", type=_ints, default=[1, 8, 32, 64], help="GPU eager vs graph batch sizes")
    p.add_argument("--contexts", type=_ints, default=[128, 2048], help="short,long contexts to compare")
    p.add_argument("--scaling-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--quick", action="store_true", help="tiny shape, short runs: checks it works")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: tok/s per batch and mode, context bars")
    return p.parse_args(argv)


def _model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    context = max(args.contexts) + 64
    if args.quick or args.synthetic:
        shape = "tiny" if args.quick and not args.synthetic else args.synthetic
        return ds.synthetic_model(shape, device, dtype, context), f"synthetic:{shape}"
    path = Path(args.model)
    if not path.exists():
        from tandem.store.model_store import ensure_model

        path = ensure_model(args.model).path
    return ds.load_model(path, device, args.dtype), str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)
    if args.quick:
        args.steps, args.repeats = 2, 1
    model, name = _model(args, device, dtype)
    short, long = args.contexts[0], args.contexts[-1]
    out: dict[str, Any] = {
        "machine": machine_info(),
        "model": name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch.") + ("+packed" * model.has_packed_weights),
        "threads": torch.get_num_threads(),
        "ops_per_layer": [ds.ops_per_layer(model, b, short, device) for b in (1, 8)],
        "plan_ms_batch256": ds.plan_time_ms(model, 256, short, repeats=20),
        "context_scaling": ds.context_scaling(
            model, args.scaling_batch, (short, long), args.steps, args.repeats, device
        ),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["graphs_vs_eager"] = ds.graphs_vs_eager(
            model, args.batches, short, args.steps * 4, args.repeats, device
        )
    out["machine"]["load_avg_after"] = list(os.getloadavg())
    return out


def report(r: dict[str, Any]) -> str:
    lines = [f"decode step: {r['model']} on {r['device']} ({r['dtype']}, {r['threads']} threads)"]
    m = r["machine"]
    lines.append(f"  load avg at start {m['load_avg_at_start']}, after {m['load_avg_after']}")
    for o in r["ops_per_layer"]:
        lines.append(
            f"  batch {o['batch']}: {o['kernels_per_layer']:.1f} kernels, {o['allocations_per_layer']:.1f} "
            f"allocations, {o['views_per_layer']:.1f} views per layer ({o['kernels_per_step']} a step)"
        )
    lines.append(f"  host planning of a batch-256 decode step: {r['plan_ms_batch256']:.3f} ms")
    cs = r["context_scaling"]
    short, long = (str(c) for c in cs["contexts"])
    lines.append(
        f"  context scaling, batch {cs['batch']}: {cs['tokens_per_s'][short]:.1f} tok/s at {short}, "
        f"{cs['tokens_per_s'][long]:.1f} at {long}: ratio {cs['ratio']:.2f} (target >= {cs['target']})"
    )
    for row in r.get("graphs_vs_eager", []):
        lines.append(
            f"  batch {row['batch_size']:>4} {row['mode']:>5}: {row['tokens_per_s']:9.1f} tok/s, "
            f"{row['ms_per_step']:.3f} ms/step"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _args(argv)
    results = run(args)
    sys.stdout.write(report(results))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(round_floats(results), indent=2) + "\n")
    if args.plot:
        ds.write_plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
