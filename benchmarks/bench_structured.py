"""Structured output's cost to a shared batch (the `structured` section of `tandem bench`).

    python benchmarks/bench_structured.py [--model PATH] [--repeats 5] [--max-tokens 64] [--no-overlap]

See tandem/bench/structured.py for what is measured.
"""

from __future__ import annotations

import argparse

from tandem.bench.structured import StructuredSizes, run_structured, structured_lines
from tandem.store.model_store import ensure_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    path = args.model or str(ensure_model("smollm2:135m").path)
    sizes = StructuredSizes(max_tokens=args.max_tokens, repeats=args.repeats)
    r = run_structured(path, sizes, overlap=not args.no_overlap, dtype=args.dtype)
    print("\n".join(structured_lines(r)))


if __name__ == "__main__":
    main()
