"""The real pipeline: scheduler and worker processes, shared-memory ring, ZeroMQ, a tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType
from pipeline_driver import Outcome, cancel, make_engine, pump, run_all, stats, submit

from tandem.engine.router import EngineError
from tandem.engine.sync import SyncEngine
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.messages import SamplingParams

pytestmark = pytest.mark.usefixtures("no_leaks")

PROMPTS = [
    [5, 6, 7, 8, 9],
    [40, 41, 42],
    list(range(60, 100)),
    [200],
    list(range(3, 45)) * 2,
    [100, 7, 100, 7],
]


def mixed_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    """Every request runs to max_tokens (ignore_eos): whether the random model samples its EOS
    token depends on the compute dtype's rounding, not on what these tests check."""
    reqs: dict[str, tuple[list[int], SamplingParams]] = {}
    for i, prompt in enumerate(PROMPTS):
        reqs[f"greedy{i}"] = (prompt, SamplingParams(max_tokens=8 + 5 * i, temperature=0.0, ignore_eos=True))
        reqs[f"sampled{i}"] = (
            prompt,
            SamplingParams(
                max_tokens=20, temperature=0.9, top_k=20 + i, top_p=0.95, seed=1000 + i, ignore_eos=True
            ),
        )
    reqs["penalized"] = (
        PROMPTS[0],
        SamplingParams(
            max_tokens=24,
            temperature=0.0,
            repetition_penalty=1.3,
            frequency_penalty=0.5,
            presence_penalty=0.4,
            ignore_eos=True,
        ),
    )
    reqs["minp"] = (
        PROMPTS[1],
        SamplingParams(max_tokens=16, temperature=1.2, min_p=0.1, seed=5, ignore_eos=True),
    )
    return reqs


def test_concurrent_requests_equal_single_runs(engine) -> None:
    reqs = mixed_requests()
    together = run_all(engine, reqs)
    for rid, (prompt, params) in reqs.items():
        alone = run_all(engine, {rid: (prompt, params)})[rid]
        t = together[rid]
        assert t.terminals == 1 and t.error is None, rid
        assert t.finished is not None and t.finished.finish_reason == "length"
        assert len(t.token_ids) == params.max_tokens
        assert t.token_ids == alone.token_ids, rid
    st = stats(engine)
    assert st.running == 0 and st.waiting == 0 and st.kv_blocks_used == 0


def test_overlap_and_sync_give_identical_greedy_tokens(tiny_gguf: Path) -> None:
    reqs = {f"r{i}": (p, SamplingParams(max_tokens=30, temperature=0.0)) for i, p in enumerate(PROMPTS)}
    reqs["seeded"] = (PROMPTS[2], SamplingParams(max_tokens=30, temperature=0.8, seed=42))
    results = {}
    for overlap in (True, False):
        eng = make_engine(tiny_gguf, overlap=overlap, max_num_batched_tokens=32)  # forces chunked prefill
        try:
            results[overlap] = run_all(eng, reqs)
        finally:
            eng.close()
    for rid in reqs:
        assert results[True][rid].token_ids == results[False][rid].token_ids, rid
        assert len(results[True][rid].token_ids) == 30


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine) -> None:
    p = PROMPTS[0]
    a = run_all(engine, {"a": (p, SamplingParams(max_tokens=24, temperature=1.0, seed=7))})["a"]
    b = run_all(engine, {"b": (p, SamplingParams(max_tokens=24, temperature=1.0, seed=7))})["b"]
    c = run_all(engine, {"c": (p, SamplingParams(max_tokens=24, temperature=1.0, seed=8))})["c"]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_strings_and_stop_tokens(engine) -> None:
    free = run_all(engine, {"f": (PROMPTS[1], SamplingParams(max_tokens=30, temperature=0.0))})["f"]
    text = free.text
    assert len(text) > 6
    stop = text[3:5]
    got = run_all(engine, {"s": (PROMPTS[1], SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))})[
        "s"
    ]
    assert got.finished is not None and got.finished.finish_reason == "stop"
    assert got.finished.stop_reason == stop
    assert got.text == text[: text.index(stop)]
    tok = free.token_ids[4]
    got = run_all(
        engine, {"t": (PROMPTS[1], SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[tok]))}
    )["t"]
    assert got.finished is not None and got.finished.stop_reason == tok
    assert got.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]


def test_cancel_mid_stream_frees_slot_and_blocks(engine) -> None:
    outcomes = {"long": Outcome()}
    submit(engine, "long", PROMPTS[4], SamplingParams(max_tokens=900, temperature=0.0))
    pump(engine, outcomes, until=lambda o: len(o["long"].token_ids) >= 5)
    assert stats(engine).kv_blocks_used > 0
    cancel(engine, "long")
    pump(engine, outcomes)
    o = outcomes["long"]
    assert o.terminals == 1 and o.finished is not None and o.finished.finish_reason == "cancelled"
    st = stats(engine)
    assert st.running == 0 and st.kv_blocks_used == 0


def test_cancel_during_chunked_prefill(tiny_gguf: Path) -> None:
    eng = make_engine(tiny_gguf, max_num_batched_tokens=16)
    try:
        outcomes = {"p": Outcome()}
        submit(eng, "p", list(range(3, 250)) * 3, SamplingParams(max_tokens=5, temperature=0.0))
        cancel(eng, "p")
        pump(eng, outcomes)
        assert outcomes["p"].terminals == 1
        assert outcomes["p"].token_ids == []
        st = stats(eng)
        assert st.running == 0 and st.kv_blocks_used == 0
    finally:
        eng.close()


def test_admission_errors_are_immediate_and_clear(engine) -> None:
    """Through the engine client, which applies the request rules (tandem.validation) once."""
    ctx = engine.context_length
    reqs = {
        "too_long": ([5] * (ctx + 3), SamplingParams(max_tokens=4)),
        "too_much": ([5] * 10, SamplingParams(max_tokens=ctx)),
        "bad_temp": ([5], SamplingParams(temperature=-1.0)),
        "bad_top_p": ([5], SamplingParams(top_p=0.0)),
        "bad_token": ([5, 10**6], SamplingParams(max_tokens=2)),
        "empty": ([], SamplingParams(max_tokens=2)),
    }
    out = SyncEngine(engine).run_all(reqs, timeout=10)
    assert all(isinstance(e, EngineError) for e in out.values()), out
    assert out["too_long"].code == "context_length"
    assert str(ctx + 3) in str(out["too_long"]) and str(ctx) in str(out["too_long"])
    assert out["too_much"].code == "context_length" and str(10 + ctx) in str(out["too_much"])
    assert "temperature" in str(out["bad_temp"])
    assert "top_p" in str(out["bad_top_p"])
    assert "1000000" in str(out["bad_token"])
    assert out["empty"].code == "invalid_request"


def test_request_larger_than_kv_pool_is_refused_not_queued(tiny_gguf: Path) -> None:
    eng = make_engine(tiny_gguf, kv_cache_memory=64 * 2**10)  # a handful of blocks
    try:
        pool = eng.ready_info["memory_plan"]["kv_tokens"]
        out = run_all(eng, {"big": ([5] * (pool + 1), SamplingParams(max_tokens=2))}, timeout=10)
        assert out["big"].error is not None and out["big"].error.code == "context_length"
        assert str(pool) in out["big"].error.message
    finally:
        eng.close()


def test_preemption_under_kv_pressure_keeps_outputs(tiny_gguf: Path) -> None:
    reqs = {f"r{i}": (p, SamplingParams(max_tokens=40, temperature=0.0)) for i, p in enumerate(PROMPTS)}
    # Recompute runs a preempted prefix as one prefill, rounded differently from the decode steps
    # that first produced it: float32 keeps that below any flip of a greedy token, bf16 does not.
    roomy = make_engine(tiny_gguf, dtype="float32")
    try:
        expected = run_all(roomy, reqs)
        plan = roomy.ready_info["memory_plan"]
    finally:
        roomy.close()
    # 14 blocks hold any one request, not all of them at once.
    block_bytes = plan["kv_cache_bytes"] // plan["kv_blocks"]
    tight = make_engine(tiny_gguf, dtype="float32", kv_cache_memory=14 * block_bytes)
    try:
        got = run_all(tight, reqs)
        st = stats(tight)
    finally:
        tight.close()
    assert st.preemptions > 0
    for rid in reqs:
        assert got[rid].token_ids == expected[rid].token_ids, rid


def test_queue_full_gives_busy(tiny_gguf: Path) -> None:
    eng = make_engine(tiny_gguf, max_queue=1, max_num_seqs=1)
    try:
        reqs = {f"q{i}": (PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0)) for i in range(4)}
        out = run_all(eng, reqs)
        busy = [rid for rid, o in out.items() if o.error is not None]
        assert busy and all(out[r].error.code == "busy" for r in busy)
        assert "busy" in out[busy[0]].error.message
        assert all(o.terminals == 1 for o in out.values())
        assert any(o.finished is not None for o in out.values())
    finally:
        eng.close()


def test_worker_killed_mid_stream_fails_requests_then_recovers(tiny_gguf: Path) -> None:
    eng = make_engine(tiny_gguf)
    try:
        outcomes = {f"k{i}": Outcome() for i in range(3)}
        for rid in outcomes:
            submit(eng, rid, PROMPTS[0], SamplingParams(max_tokens=900, temperature=0.0))
        pump(eng, outcomes, until=lambda o: all(len(x.token_ids) >= 3 for x in o.values()))
        os.kill(eng.ready_info["worker_pid"], signal.SIGKILL)
        t0 = time.monotonic()
        pump(eng, outcomes, timeout=10)
        assert time.monotonic() - t0 < 5
        for o in outcomes.values():
            assert o.terminals == 1 and o.error is not None and o.error.code == "worker_died"
            assert "SIGKILL" in o.error.message or "killed" in o.error.message
        # The scheduler restarts the worker; new requests are served again.
        after = run_all(
            eng, {"after": (PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0))}, timeout=60
        )
        assert after["after"].finished is not None and len(after["after"].token_ids) == 5
        assert stats(eng).worker_restarts == 1
    finally:
        eng.close()


def test_scheduler_never_imports_torch() -> None:
    code = (
        "import sys, tandem.scheduler.process, tandem.engine.process, tandem.engine.sync;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_penalties_see_the_whole_prompt_even_when_it_is_cached(engine) -> None:
    prompt = list(range(3, 40))  # two full blocks: a second run would hit the prefix cache
    plain = SamplingParams(max_tokens=4, temperature=0.0)
    pen = SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0)
    run_all(engine, {"warm": (prompt, plain)})  # caches the prompt's blocks
    first = run_all(engine, {"p1": (prompt, pen)})["p1"]
    second = run_all(engine, {"p2": (prompt, pen)})["p2"]
    assert first.token_ids == second.token_ids
    assert first.finished is not None and first.finished.cached_tokens == 0


def test_quantized_file_is_served_from_packed_weights(tmp_path: Path) -> None:
    """--dtype auto keeps a Q4_1 file's matrices packed in the worker, a quarter of float32's bytes."""
    path = write_tiny_gguf(tmp_path / "q4.gguf", TinySpec(context=1024, qtype=GGMLQuantizationType.Q4_1))
    plans = {}
    for dtype in ("auto", "float32"):
        eng = make_engine(path, dtype=dtype)
        try:
            plans[dtype] = eng.ready_info["memory_plan"]
            out = run_all(eng, {"q": (PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0))})["q"]
            assert out.terminals == 1 and out.finished is not None and len(out.token_ids) == 6
        finally:
            eng.close()
    assert plans["auto"]["dtype"].endswith("+packed") and plans["float32"]["dtype"] == "float32"
    # the packed weights; the layers' dense bf16 copies, when timing at load kept them, come on top
    auto, f32 = plans["auto"], plans["float32"]
    assert auto["weights_bytes"] - auto["dense_copy_bytes"] < f32["weights_bytes"] / 3
    assert auto["weights_bytes"] < f32["weights_bytes"] and f32["dense_copy_bytes"] == 0


def test_one_requests_bad_data_never_kills_the_scheduler(engine) -> None:
    """Frames that bypass the engine client's checks (a buggy or hostile peer of the scheduler
    socket) fail their own request, by the scheduler's guards of what its ring and the model can
    hold; the scheduler keeps serving everyone else. (A value that is out of range but harmless,
    such as a stop token id past the vocabulary, is the front end's to refuse, not the guards'.)"""
    bad = {
        "huge_top_k": ([5, 6], SamplingParams(max_tokens=2, top_k=2**31)),
        "logits_300": ([5, 6], SamplingParams(max_tokens=2, return_logits=300)),  # type: ignore[arg-type]
        "str_token": ([5, "six"], SamplingParams(max_tokens=2)),  # type: ignore[list-item]
        "big_token": ([5, 10**6], SamplingParams(max_tokens=2)),
        "str_temp": ([5, 6], SamplingParams(max_tokens=2, temperature="hot")),  # type: ignore[arg-type]
    }
    good = {"good": ([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))}
    out = run_all(engine, {**bad, **good}, timeout=30)
    for rid in bad:
        assert out[rid].terminals == 1 and out[rid].error is not None, rid
        assert out[rid].error.code in ("invalid_request", "internal"), rid
    assert "top_k" in out["huge_top_k"].error.message
    assert "return_logits" in out["logits_300"].error.message  # refused as the frame decodes
    assert "embedding" in out["big_token"].error.message
    assert out["good"].error is None and len(out["good"].token_ids) == 4
    again = run_all(engine, good, timeout=30)["good"]
    assert again.token_ids == out["good"].token_ids


def test_hung_compute_with_live_heartbeats_is_caught_by_the_progress_watchdog(tiny_gguf: Path) -> None:
    """The worker's compute thread blocks at step 6 while its heartbeat thread runs on: only the
    progress watchdog can tell. The step is reported overdue, then handled as a crash."""
    eng = make_engine(tiny_gguf, step_timeout=1.0, inject_fault="hang@6")
    try:
        outcomes = {"h": Outcome()}
        submit(eng, "h", PROMPTS[0], SamplingParams(max_tokens=500, temperature=0.0))
        pump(eng, outcomes, until=lambda o: len(o["h"].token_ids) >= 3)
        t0 = time.monotonic()
        overdue = 0.0
        while overdue == 0.0 and time.monotonic() - t0 < 5:
            overdue = stats(eng).step_overdue_s
        assert overdue > 0.0, "the hung step was never reported overdue"
        pump(eng, outcomes, timeout=10)
        waited = time.monotonic() - t0
        o = outcomes["h"]
        assert o.terminals == 1 and o.error is not None and o.error.code == "worker_died"
        assert "no progress" in o.error.message, o.error.message
        assert waited < 5, f"hang detected only after {waited:.1f} s"
        after = run_all(eng, {"after": (PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0))}, 60)
        assert after["after"].finished is not None and len(after["after"].token_ids) == 5
        s = stats(eng)
        assert s.worker_restarts == 1 and s.step_overdue_s == 0.0
    finally:
        eng.close()


def test_a_request_that_had_sent_nothing_is_replayed_on_the_restarted_worker(tiny_gguf: Path) -> None:
    """Step 3 hangs: by then `a` has streamed tokens (it fails, naming the cause), while `b`'s
    long prompt is still being prefilled in chunks; `b` is replayed on the next worker and its
    client gets exactly the reply of an undisturbed run."""
    long_prompt = [(7 * i) % 200 + 3 for i in range(100)]  # 7 chunks of 16 tokens
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eng = make_engine(tiny_gguf, step_timeout=1.0, inject_fault="hang@3", max_num_batched_tokens=16)
    try:
        outcomes = {"a": Outcome(), "b": Outcome()}
        submit(eng, "a", PROMPTS[0], SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        submit(eng, "b", long_prompt, greedy)
        pump(eng, outcomes, timeout=30)
        assert outcomes["a"].terminals == 1 and outcomes["a"].error is not None
        assert outcomes["a"].error.code == "worker_died" and outcomes["a"].token_ids
        assert outcomes["b"].terminals == 1 and outcomes["b"].error is None, outcomes["b"].error
        assert stats(eng).worker_restarts == 1
        solo = run_all(eng, {"solo": (long_prompt, greedy)}, timeout=30)["solo"]
        assert outcomes["b"].token_ids == solo.token_ids and len(solo.token_ids) == 6
    finally:
        eng.close()


def test_worker_deaths_far_apart_never_exhaust_the_restarts(tiny_gguf: Path) -> None:
    """Deaths count within a sliding window: three spread out past it are each restarted."""
    eng = make_engine(tiny_gguf, max_worker_deaths=2, worker_death_window=0.5)
    try:
        for i in range(3):
            os.kill(stats(eng).memory_plan["worker_pid"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while stats(eng).worker_restarts <= i and time.monotonic() < deadline:
                time.sleep(0.1)
            req = {f"r{i}": (PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0))}
            out = run_all(eng, req, timeout=60)[f"r{i}"]
            assert out.finished is not None, out.error
            time.sleep(0.6)
        assert stats(eng).worker_restarts == 3
        assert eng.check() is None
    finally:
        eng.close()


def test_worker_deaths_within_the_window_stop_the_engine(tiny_gguf: Path) -> None:
    eng = make_engine(tiny_gguf, max_worker_deaths=2, worker_death_window=60.0)
    try:
        os.kill(stats(eng).memory_plan["worker_pid"], signal.SIGKILL)
        run_all(eng, {"a": (PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0))}, timeout=60)
        os.kill(stats(eng).memory_plan["worker_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while eng.check() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        problem = eng.check()
        assert problem is not None and "2 times within 60 s" in problem, problem
    finally:
        eng.close()
