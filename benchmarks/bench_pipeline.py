"""The race against transformers and llama-server, overlap vs sync throughput, scheduler CPU per
step and model-stack timings, in one run.

    python benchmarks/bench_pipeline.py                      # everything (a few minutes on 2 cores)
    python benchmarks/bench_pipeline.py --quick --section scheduler
    python benchmarks/bench_pipeline.py --json-out benchmarks/results/$(date +%F)-cpu.json

The same as `tandem bench` (same options): the logic lives in `tandem.bench`. See README.md here.
"""

from __future__ import annotations

import logging

from tandem.commands.bench import bench

if __name__ == "__main__":  # the engine spawns processes: importing this file must not run it
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bench(prog_name="bench_pipeline.py")
