"""Benchmarks: the race of tandem serve against transformers and llama-server (race.py), the step
pipeline, the scheduler's CPU cost and the model stack.

`run_bench(BenchOptions(...))` runs the sections and returns a JSON-ready dict;
`format_report` turns it into tables. `tandem bench` and benchmarks/bench_pipeline.py wrap both.
"""

from tandem.bench.report import format_report
from tandem.bench.suite import SECTIONS, BenchOptions, expand_sections, run_bench

__all__ = ["SECTIONS", "BenchOptions", "expand_sections", "format_report", "run_bench"]
