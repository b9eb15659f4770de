"""Grammar-constrained sampling through the real pipeline (scheduler + worker processes) on a
tiny random-weight model: outputs follow their schemas even though the weights are noise, and
unconstrained requests sharing the batch are untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from pipeline_driver import Outcome, cancel, make_engine, pump, run_all, submit

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.messages import FinishReason, SamplingParams
from tandem.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("no_leaks")

# Bounded everywhere: a random model picks among allowed tokens about uniformly, so an unbounded
# string or number would run to max_tokens before it closed.
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "vip": {"type": "boolean"}},
            "required": ["id", "vip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "ok", "tags", "owner"],
    "additionalProperties": False,
}


def schema_params(schema: dict, **kw: object) -> SamplingParams:
    settings: dict = {"max_tokens": 200, "temperature": 0.0, **kw}
    return SamplingParams(grammar_kind="json_schema", grammar=json.dumps(schema), **settings)


def unconstrained() -> dict[str, tuple[list[int], SamplingParams]]:
    return {
        f"free{i}": ([5 + i, 6, 7, 40 + i], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        for i in range(3)
    } | {"free_sampled": ([9, 8, 7], SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True))}


def constrained() -> dict[str, tuple[list[int], SamplingParams]]:
    return {
        "nested_greedy": ([5, 6, 7], schema_params(NESTED)),
        "nested_sampled": ([9, 10], schema_params(NESTED, temperature=1.0, top_k=50, top_p=0.9, seed=11)),
        "penalized": ([11, 12], schema_params(NESTED, temperature=0.7, seed=2, repetition_penalty=1.3)),
        "regex": (
            [13],
            SamplingParams(
                max_tokens=40, temperature=0.0, grammar_kind="regex", grammar=r"[0-9]{3}-[a-c]{2}"
            ),
        ),
    }


@pytest.fixture(scope="module")
def tiny_path(tiny_gguf: Path) -> Path:
    return tiny_gguf


def _check(outs: dict[str, Outcome], tok: Tokenizer) -> None:
    for rid in constrained():
        o = outs[rid]
        assert o.error is None and o.finished is not None, (rid, o.error)
        assert o.finished.finish_reason == FinishReason.STOP, (rid, o.finished, o.text)
        if rid == "regex":
            assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", o.text), o.text
        else:
            jsonschema.validate(json.loads(o.text), NESTED)


@pytest.mark.parametrize("overlap", [True, False])
def test_constrained_share_the_batch_and_free_rows_match_solo(tiny_path: Path, overlap: bool) -> None:
    tok = Tokenizer.from_gguf(tiny_path)
    eng = make_engine(tiny_path, overlap=overlap)
    try:
        solo = run_all(eng, unconstrained())
        mixed = run_all(eng, unconstrained() | constrained())
        again = run_all(eng, constrained())  # the worker's compiled grammars, cached by text
    finally:
        eng.close()
    for rid in unconstrained():
        assert mixed[rid].token_ids == solo[rid].token_ids, rid
    _check(mixed, tok)
    _check(again, tok)
    for rid in ("nested_greedy", "regex"):  # greedy: the same answer alone and in a batch
        assert again[rid].token_ids == mixed[rid].token_ids


def test_length_inside_an_unfinished_structure(tiny_path: Path) -> None:
    eng = make_engine(tiny_path)
    try:
        outs = run_all(eng, {"short": ([5, 6], schema_params(NESTED, max_tokens=5))})
    finally:
        eng.close()
    o = outs["short"]
    assert o.finished is not None and o.finished.finish_reason == FinishReason.LENGTH
    assert len(o.token_ids) == 5
    assert '{"name":"'.startswith(o.text[:9]), o.text  # the schema's start, cut off


def test_cancel_and_preemption_keep_matchers_right(tmp_path: Path) -> None:
    """A KV pool too small for every request at once: constrained requests get preempted and
    recomputed (their matcher replayed), one is cancelled mid-way; the others still validate."""
    path = write_tiny_gguf(tmp_path / "t.gguf", TinySpec(context=1024))
    eng = make_engine(path, kv_cache_memory=2**17, block_size=16, max_num_seqs=8)
    try:
        reqs = {
            f"c{i}": ([5 + i, 6, 7] * 10, schema_params(NESTED, temperature=0.9, seed=i)) for i in range(6)
        }
        outs = {rid: Outcome() for rid in reqs}
        for rid, (prompt, params) in reqs.items():
            submit(eng, rid, prompt, params)
        pump(eng, outs, until=lambda o: len(o["c0"].token_ids) >= 3)
        cancel(eng, "c0")
        pump(eng, outs)
        preemptions = eng_stats_preemptions(eng)
    finally:
        eng.close()
    assert outs["c0"].finished is not None and outs["c0"].finished.finish_reason == FinishReason.CANCELLED
    for rid in list(reqs)[1:]:
        o = outs[rid]
        assert o.terminals == 1 and o.finished is not None, (rid, o.error)
        assert o.finished.finish_reason == FinishReason.STOP, (rid, o.text)
        jsonschema.validate(json.loads(o.text), NESTED)
    assert preemptions > 0, "the pool was meant to be too small: nothing was preempted"


def eng_stats_preemptions(eng) -> int:
    from pipeline_driver import stats

    return stats(eng).preemptions


REAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog", "fish"]}, "name": {"type": "string"}},
                "required": ["kind", "name"],
                "additionalProperties": False,
            },
            "maxItems": 4,
        },
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "pets", "address"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_default_model_follows_nested_schema(default_model_path: Path) -> None:
    from tandem.prompts.build import chat_ids

    tok = Tokenizer.from_gguf(default_model_path)
    ask = "Give me a JSON record of a person called Ana who lives in Lyon and has two pets."
    ids = chat_ids(tok, [{"role": "user", "content": ask}])
    eng = make_engine(default_model_path, dtype="auto", kv_cache_memory=64 * 2**20)
    try:
        outs = run_all(
            eng,
            {
                "greedy": (ids, schema_params(REAL, max_tokens=300)),
                "sampled": (ids, schema_params(REAL, max_tokens=300, temperature=0.8, seed=5)),
                "free": (ids, SamplingParams(max_tokens=40, temperature=0.0)),
            },
            timeout=600,
        )
    finally:
        eng.close()
    for rid in ("greedy", "sampled"):
        o = outs[rid]
        assert o.finished is not None and o.finished.finish_reason == FinishReason.STOP, (rid, o.text)
        jsonschema.validate(json.loads(o.text), REAL)
    assert "Ana" in outs["greedy"].text  # the model still writes what it was asked, within the schema


def test_complete_grammar_ends_even_with_ignore_eos(tiny_path: Path) -> None:
    eng = make_engine(tiny_path)
    try:
        params = SamplingParams(
            max_tokens=50, temperature=0.0, ignore_eos=True, grammar_kind="regex", grammar="[ab]{3}"
        )
        outs = run_all(eng, {"r": ([5, 6], params)})
    finally:
        eng.close()
    assert outs["r"].finished.finish_reason == FinishReason.STOP and re.fullmatch("[ab]{3}", outs["r"].text)
