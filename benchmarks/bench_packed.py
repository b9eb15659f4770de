"""Packed GGUF weights (--dtype auto) against the float32 path, side by side in one run.

    python benchmarks/bench_packed.py                        # both sections, a few minutes on 2 cores
    python benchmarks/bench_packed.py --section system --batches 1,8,32 --json-out out.json

- ``stack``: the bare forward of each variant in this process (no scheduler, the worker's default
  thread count): decode step time at each batch size and prefill time, interleaved repeat by
  repeat, plus the weights' bytes.
- ``system``: the whole engine (scheduler + worker processes, greedy, ignore_eos) per variant,
  including the worker's thread count, runs alternated A B C A B C so drift lands on every
  variant. This is how the worker's default thread count was chosen (see ModelRunner).

Every figure is a median; the ratios are against the first variant, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from contextlib import ExitStack
from typing import Any

import torch
from tandem.gateway.engine_process import EngineProcess

from tandem.bench.pipeline import prompts_for_run, run_batch
from tandem.config import EngineConfig
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.llama import LlamaModel
from tandem.gpu_worker.runner import build_model, default_threads
from tandem.store.model_store import ensure_model

BLOCK = 16


def _step_ms(model: LlamaModel, kv: KVCache, table: torch.Tensor, start: int, n: int, batch: int) -> float:
    """One forward of ``n`` new tokens for each of ``batch`` sequences; wall ms incl. metadata."""
    ids = torch.randint(0, model.config.vocab_size, (batch * n,))
    pos = torch.arange(start, start + n).repeat(batch)
    t0 = time.perf_counter()
    meta = AttentionMetadata.build(pos, [n] * batch, [start + n] * batch, table, BLOCK)
    model(ids, pos, kv, meta, torch.arange(1, batch + 1) * n - 1).argmax(-1)
    return (time.perf_counter() - t0) * 1000


def stack(path: str, batches: list[int], prefill: int, decode: int, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(default_threads())  # as the worker runs: see default_threads
    models = {name: build_model(path, name, torch.device("cpu")) for name in ("float32", "auto")}
    pools = {}
    for (name, m), b in ((nm, b) for nm in models.items() for b in batches):
        per_seq = -(-(prefill + decode) // BLOCK)
        kv = KVCache.allocate(m.config, b * per_seq, BLOCK, m.dtype)
        pools[name, b] = (m, kv, torch.arange(b * per_seq, dtype=torch.int32).view(b, per_seq))
    times: dict[tuple[str, int], dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in pools}
    for rep in range(repeats + 1):  # rep 0 warms up
        for key, (m, kv, table) in pools.items():
            b = key[1]
            p = _step_ms(m, kv, table, 0, prefill, b)
            d = [_step_ms(m, kv, table, prefill + i, 1, b) for i in range(decode)]
            if rep:
                times[key]["prefill"].append(p)
                times[key]["decode"].append(statistics.median(d))
    out: dict[str, Any] = {"weights_bytes": {n: m.weights_bytes for n, m in models.items()}, "points": []}
    for (name, b), t in times.items():
        dec = statistics.median(t["decode"])
        pre = statistics.median(t["prefill"])
        out["points"].append(
            {
                "variant": name,
                "batch": b,
                "decode_ms": dec,
                "decode_tok_s": b * 1000 / dec,
                "prefill_ms": pre,
                "prefill_tok_s": b * prefill * 1000 / pre,
            }
        )
    return out


def system(
    path: str, variants: dict[str, dict[str, Any]], batches: list[int], tokens: int, repeats: int
) -> dict[str, Any]:
    runs: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants for b in batches}
    plans = {}
    with ExitStack() as es:
        engines = {}
        for name, kw in variants.items():
            cfg = EngineConfig(model_path=path, model_name="bench", max_num_seqs=max(8, *batches), **kw)
            engines[name] = es.enter_context(EngineProcess(cfg))
            plans[name] = engines[name].ready_info["memory_plan"]
        run_id = 0
        for b in batches:
            for rep in range(repeats + 1):  # rep 0 warms up
                for name, eng in engines.items():
                    run_id += 1
                    res = run_batch(eng, prompts_for_run(eng, run_id, b), tokens, 600)
                    logging.info("%s batch %d rep %d: %.1f tok/s", name, b, rep, res.decode_tok_s)
                    if rep:
                        runs[name, b].append(res.decode_tok_s)
    return {
        "variants": variants,
        "memory_plan": plans,
        "points": [
            {"variant": v, "batch": b, "decode_tok_s": statistics.median(r), "runs": r}
            for (v, b), r in runs.items()
        ],
    }


def _print_table(title: str, points: list[dict[str, Any]], key: str) -> None:
    print(f"\n{title}")
    base = {p["batch"]: p[key] for p in points if p["variant"] == points[0]["variant"]}
    for p in points:
        print(
            f"  {p['variant']:>10}  batch {p['batch']:>3}: {p[key]:8.1f} tok/s  "
            f"x{p[key] / base[p['batch']]:.2f} vs {points[0]['variant']}"
        )


def _variant(name: str) -> dict[str, Any]:
    """``DTYPE-tN``: --dtype DTYPE with N worker threads."""
    dtype, _, threads = name.rpartition("-t")
    if not dtype or not threads.isdigit():
        raise SystemExit(f"variant {name!r} is not DTYPE-tTHREADS (e.g. auto-t2)")
    return {"dtype": dtype, "threads": int(threads)}


def main() -> None:
    n = os.cpu_count() or 2
    # float32 on all cores but one: the engine's defaults before packed weights.
    default_variants = f"float32-t{max(1, n - 1)},auto-t{max(1, n - 1)},auto-t{n}"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--section", choices=["stack", "system", "all"], default="all")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64, help="generated per request in the system runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--variants",
        default=default_variants,
        help=f"system section: DTYPE-tTHREADS,... (default {default_variants})",
    )
    ap.add_argument("--json-out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = str(ensure_model(args.model).path)
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {"model": args.model, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    if args.section in ("stack", "all"):
        out["stack"] = stack(path, batches, prefill=128, decode=16, repeats=args.repeats)
        _print_table(
            f"bare forward (this process, torch threads {torch.get_num_threads()})",
            out["stack"]["points"],
            "decode_tok_s",
        )
        _print_table("bare prefill of 128 tokens per sequence", out["stack"]["points"], "prefill_tok_s")
        print("  weights bytes:", out["stack"]["weights_bytes"])
    if args.section in ("system", "all"):
        variants = {v: _variant(v) for v in args.variants.split(",")}
        out["system"] = system(path, variants, batches, args.tokens, args.repeats)
        _print_table(
            f"whole engine, {args.tokens} greedy tokens per request", out["system"]["points"], "decode_tok_s"
        )
    out["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {out['loadavg_start']}, at end {out['loadavg_end']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":  # the engine spawns processes: importing this file must not run it
    main()
