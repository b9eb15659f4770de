"""The structured-output section: what grammar-constrained rows cost the batch they share.

8 greedy requests on one engine, alternating a batch without schemas (A) and the same batch with
requests 4-7 constrained by a 20-property JSON schema (B, long enough that every request runs to
max_tokens). Per request, decode tokens/s = (completion tokens - 1) / decode time; medians over
repeats. Targets (issue 10): unconstrained rows in B >= 0.9x their tok/s in A, constrained >=
0.7x. The worker's matcher time per constrained row per step comes from the scheduler's grammar
counters (the same figures /metrics serves).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from tandem.config import EngineConfig
from tandem.engine.process import EngineProcess
from tandem.engine.router import Completion
from tandem.engine.sync import SyncEngine
from tandem.messages import SamplingParams

PROMPTS = (
    "Describe a city you like.",
    "Write a short story about a cat.",
    "Explain how rain forms.",
    "List some uses of copper.",
    "Describe a customer record.",
    "Give a product for the shop.",
    "Make up a user profile.",
    "Invent a book for the library.",
)


@dataclass(frozen=True)
class StructuredSizes:
    max_tokens: int = 64
    repeats: int = 5


def schema_20() -> dict[str, Any]:
    kinds = ("string", "integer", "boolean", "number")
    props: dict[str, Any] = {f"field_{i}": {"type": kinds[i % 4]} for i in range(20)}
    for i in range(0, 20, 4):
        props[f"field_{i}"]["maxLength"] = 24
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _tok_s(c: Completion) -> float:
    f = c.finished
    return (f.completion_tokens - 1) / f.decode_s if f is not None and f.decode_s > 0 else 0.0


def run_structured(
    model_path: str,
    sizes: StructuredSizes,
    overlap: bool = True,
    threads: int | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    from tandem.prompts.build import chat_ids

    cfg = EngineConfig(
        model_path=model_path, model_name="bench", dtype=dtype, overlap=overlap, threads=threads
    )
    proc = EngineProcess(cfg).start()
    eng = SyncEngine(proc)
    assert proc.tokenizer is not None
    ids = [chat_ids(proc.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    schema = json.dumps(schema_20())

    def batch(constrained: bool) -> dict[str, Any]:
        reqs = {}
        for i, prompt in enumerate(ids):
            p = SamplingParams(max_tokens=sizes.max_tokens, temperature=0.0, ignore_eos=True)
            if constrained and i >= 4:
                p = SamplingParams(
                    max_tokens=sizes.max_tokens, temperature=0.0, grammar_kind="json_schema", grammar=schema
                )
            reqs[f"r{i}"] = (prompt, p)
        return eng.run_all(reqs, timeout=600)

    free_a: list[float] = []
    free_b: list[float] = []
    cons_b: list[float] = []
    mask_ms: list[float] = []
    try:
        batch(True)  # warm-up, and the grammar compiled and cached in the worker
        for _ in range(sizes.repeats):
            a = batch(False)
            before = eng.stats()
            b = batch(True)
            after = eng.stats()
            rows = after.grammar_rows_total - before.grammar_rows_total
            mask_ms.append((after.grammar_ms_total - before.grammar_ms_total) / max(rows, 1))
            free_a.append(statistics.median(_tok_s(a[f"r{i}"]) for i in range(8)))
            free_b.append(statistics.median(_tok_s(b[f"r{i}"]) for i in range(4)))
            cons_b.append(statistics.median(_tok_s(b[f"r{i}"]) for i in range(4, 8)))
    finally:
        proc.close()
    base = statistics.median(free_a)
    fb, cb = statistics.median(free_b), statistics.median(cons_b)
    return {
        "overlap": overlap,
        "max_tokens": sizes.max_tokens,
        "repeats": sizes.repeats,
        "no_schema_tok_s": base,
        "unconstrained_tok_s": fb,
        "constrained_tok_s": cb,
        "unconstrained_ratio": fb / base if base else 0.0,
        "constrained_ratio": cb / base if base else 0.0,
        "mask_ms_per_row_step": statistics.median(mask_ms),
    }


def structured_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"Structured output (8 greedy requests, 4 with a 20-property JSON schema, overlap={r['overlap']})",
        f"  no schemas in the batch:            {r['no_schema_tok_s']:7.1f} tok/s per request",
        f"  unconstrained beside 4 constrained: {r['unconstrained_tok_s']:7.1f} tok/s "
        f"({r['unconstrained_ratio']:.2f}x, target >= 0.9x)",
        f"  constrained:                        {r['constrained_tok_s']:7.1f} tok/s "
        f"({r['constrained_ratio']:.2f}x, target >= 0.7x)",
        f"  worker matcher time per constrained row per step: {r['mask_ms_per_row_step']:.3f} ms",
    ]
