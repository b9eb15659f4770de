"""Structured output's cost to a shared batch: 8 greedy requests, 4 of them with a JSON schema.

    python benchmarks/bench_structured.py [--model PATH] [--repeats 3] [--max-tokens 64] [--no-overlap]

Runs two batches alternately on one engine (the default model unless --model): A, all 8 without a
schema; B, the same 8 prompts with requests 4-7 constrained by a 20-property JSON schema (long
enough that every request runs to max_tokens). Per request, decode tokens/s = completion tokens
/ decode time (first token -> finish). Prints, as medians over repeats: the unconstrained
requests' tok/s in B against A (target >= 0.9x), the constrained ones' against A (>= 0.7x), and
the worker's matcher time per constrained row per step (the scheduler's grammar counters).
"""

from __future__ import annotations

import argparse
import json
import statistics

from tandem.config import EngineConfig
from tandem.engine.process import EngineProcess
from tandem.engine.router import Completion
from tandem.engine.sync import SyncEngine
from tandem.messages import SamplingParams
from tandem.store.model_store import ensure_model

PROMPTS = [
    "Describe a city you like.",
    "Write a short story about a cat.",
    "Explain how rain forms.",
    "List some uses of copper.",
    "Describe a customer record.",
    "Give a product for the shop.",
    "Make up a user profile.",
    "Invent a book for the library.",
]


def schema_20() -> dict:
    kinds = ("string", "integer", "boolean", "number")
    props = {f"field_{i}": {"type": kinds[i % 4]} for i in range(20)}
    for i in range(0, 20, 4):
        props[f"field_{i}"]["maxLength"] = 24
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def tok_s(c: Completion) -> float:
    f = c.finished
    return (f.completion_tokens - 1) / f.decode_s if f and f.decode_s > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    path = args.model or str(ensure_model("smollm2:135m").path)
    cfg = EngineConfig(model_path=path, model_name="bench", dtype=args.dtype, overlap=not args.no_overlap)
    proc = EngineProcess(cfg).start()
    eng = SyncEngine(proc)
    tok = proc.tokenizer
    assert tok is not None
    from tandem.prompts.build import chat_ids

    ids = [chat_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    schema = json.dumps(schema_20())

    def batch(constrained: bool) -> dict:
        reqs = {}
        for i, prompt in enumerate(ids):
            p = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
            if constrained and i >= 4:
                p = SamplingParams(
                    max_tokens=args.max_tokens, temperature=0.0, grammar_kind="json_schema", grammar=schema
                )
            reqs[f"r{i}"] = (prompt, p)
        return eng.run_all(reqs, timeout=600)

    try:
        batch(True)  # warm-up: compiles and caches the grammar in the worker
        free_a, free_b, cons_b, mask = [], [], [], []
        for _ in range(args.repeats):
            a = batch(False)
            before = eng.stats()
            b = batch(True)
            after = eng.stats()
            rows = after.grammar_rows_total - before.grammar_rows_total
            mask.append((after.grammar_ms_total - before.grammar_ms_total) / max(rows, 1))
            free_a.append(statistics.median(tok_s(a[f"r{i}"]) for i in range(8)))
            free_b.append(statistics.median(tok_s(b[f"r{i}"]) for i in range(4)))
            cons_b.append(statistics.median(tok_s(b[f"r{i}"]) for i in range(4, 8)))
            short = [b[f"r{i}"].finished.completion_tokens for i in range(4, 8)]
    finally:
        proc.close()
    base = statistics.median(free_a)
    print(f"overlap={not args.no_overlap} max_tokens={args.max_tokens} repeats={args.repeats}")
    print(f"batch without schemas: {base:.1f} tok/s per request")
    fb, cb = statistics.median(free_b), statistics.median(cons_b)
    print(f"unconstrained beside 4 constrained: {fb:.1f} tok/s ({fb / base:.2f}x)")
    print(f"constrained (20-property schema): {cb:.1f} tok/s ({cb / base:.2f}x)")
    print(f"worker matcher time per constrained row per step: {statistics.median(mask):.3f} ms")
    print(f"constrained completion tokens (last run): {short}")


if __name__ == "__main__":
    main()
