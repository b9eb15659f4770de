"""Compare llguidance and xgrammar on this machine: compile time and mask time per step.

A 20-property JSON schema, the default model's tokenizer (built by tandem from the GGUF), and a
valid instance fed token by token; each step computes the next-token bitmask, then consumes the
token. Run: ``python benchmarks/bench_grammar_libs.py [MODEL.gguf]``.
"""

from __future__ import annotations

import json
import sys
import time

from tandem.tokenizer.tokenizer import Tokenizer


def schema_20() -> dict:
    kinds = ["string", "integer", "number", "boolean"]
    props: dict = {}
    for i in range(20):
        k = kinds[i % 4]
        props[f"field_{i}"] = {"type": k} if i % 5 else {"enum": ["alpha", "beta", "gamma"]}
    props["field_3"] = {"type": "array", "items": {"type": "integer"}}
    return {"type": "object", "properties": props, "required": list(props)}


def instance(schema: dict) -> str:
    vals = {"string": "hello world", "integer": 42, "number": 3.5, "boolean": True}
    out = {}
    for name, p in schema["properties"].items():
        out[name] = (
            p["enum"][1] if "enum" in p else [1, 2, 3] if p.get("type") == "array" else vals[p["type"]]
        )
    return json.dumps(out, separators=(",", ":"))


def bench_llguidance(tok: Tokenizer, schema: dict, ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch

    from tandem.grammar.tokenizer import ll_tokenizer

    t = time.perf_counter()
    llt = ll_tokenizer(tok)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema), defaults={"whitespace_flexible": False}
    )
    m = llguidance.LLMatcher(llt, grammar)
    compile_s = time.perf_counter() - t
    assert not m.is_error(), m.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, llt.vocab_size)
    times = []
    for i in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - t)
        assert m.consume_token(i), m.get_error()
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "mask_ms": times}


def bench_xgrammar(tok: Tokenizer, schema: dict, ids: list[int]) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    pieces = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(pieces, vocab_type=xgr.VocabType.RAW, stop_token_ids=list(tok.eos_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    tok_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for i in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t)
        assert m.accept_token(i)
    return {"tokenizer_s": tok_s, "compile_s": compile_s, "mask_ms": times}


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    if path is None:
        from tandem.store.model_store import ensure_model

        path = str(ensure_model("smollm2:135m").path)
    tok = Tokenizer.from_gguf(path)
    schema = schema_20()
    ids = tok.encode(instance(schema), add_bos=False, add_eos=False)
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        r = fn(tok, schema, ids)
        ms = sorted(x * 1000 for x in r["mask_ms"])
        print(
            f"{name:10s} tokenizer {r['tokenizer_s'] * 1000:7.1f} ms  "
            f"compile {r['compile_s'] * 1000:7.2f} ms  "
            f"mask/step mean {sum(ms) / len(ms):.3f} ms  p50 {ms[len(ms) // 2]:.3f}  "
            f"p99 {ms[int(len(ms) * 0.99)]:.3f}  max {ms[-1]:.3f}  ({len(ms)} steps)"
        )


if __name__ == "__main__":
    main()
