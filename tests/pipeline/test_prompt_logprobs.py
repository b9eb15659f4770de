"""Prompt logprobs (echo) through a real engine: every prompt position's log-softmax of the next
prompt token equals transformers' float32 forward of the same tiny GGUF, chunked prefill and a
prefix already in the cache included; max_tokens 0 answers the prompt alone."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pipeline_driver import make_engine, stats

from tandem.engine.process import EngineProcess
from tandem.messages import OutputBatch, SamplingParams, SubmitRequest, decode, encode

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def small_chunks(tiny_gguf: Path) -> Iterator[EngineProcess]:
    eng = make_engine(tiny_gguf, max_num_batched_tokens=32)
    yield eng
    eng.close()


def _expected(model, prompt: list[int]) -> np.ndarray:
    """log_softmax rows of positions 0..n-2 (float32), the reference forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1].numpy()


def _run(engine: EngineProcess, rid: str, prompt: list[int], params: SamplingParams) -> dict:
    assert engine.to_sched is not None and engine.from_sched is not None
    engine.to_sched.send(encode(SubmitRequest(rid, prompt, params, time.monotonic())))
    got: dict = {"lps": [], "tops": [], "tokens": [], "deltas": 0}
    deadline = time.monotonic() + 60
    while "finished" not in got:
        assert time.monotonic() < deadline, "timed out"
        if not engine.from_sched.poll(100):
            continue
        msg = decode(engine.from_sched.recv())
        if not isinstance(msg, OutputBatch):
            continue
        for d in msg.deltas:
            assert d.request_id == rid
            if d.prompt_logprobs is not None:
                got["deltas"] += 1
                got["lps"] += d.prompt_logprobs
                got["tops"] += d.prompt_top_logprobs or []
            got["tokens"] += d.token_ids
        for f in msg.finished:
            got["finished"] = f
        assert not msg.errors, msg.errors
    return got


def _check(got: dict, ref: np.ndarray, prompt: list[int], top: int) -> None:
    assert len(got["lps"]) == len(prompt) - 1
    want = ref[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(got["lps"], want, atol=1e-4)
    assert len(got["tops"]) == len(prompt) - 1
    for row, pairs in zip(ref, got["tops"], strict=True):
        assert len(pairs) == top
        ids = [int(i) for i, _ in pairs]
        np.testing.assert_allclose([v for _, v in pairs], row[ids], atol=1e-4)
        np.testing.assert_allclose(sorted(row, reverse=True)[:top], [v for _, v in pairs], atol=1e-4)


@pytest.mark.parametrize("length", [9, 100])  # 100: four prefill chunks of 32
def test_prompt_logprobs_equal_the_reference(small_chunks, reference, length: int) -> None:
    rng = random.Random(length)
    prompt = [rng.randrange(1, 250) for _ in range(length)]
    got = _run(small_chunks, f"p{length}", prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
    _check(got, _expected(reference, prompt), prompt, 2)
    assert got["tokens"] == [] and got["finished"].completion_tokens == 0
    assert got["finished"].finish_reason == "length" and got["finished"].prompt_tokens == length
    if length > 32:
        assert got["deltas"] == 4  # chunk by chunk


def test_prompt_logprobs_with_the_prefix_already_cached(small_chunks, reference) -> None:
    rng = random.Random(5)
    shared = [rng.randrange(1, 250) for _ in range(64)]
    prompt = shared + [rng.randrange(1, 250) for _ in range(10)]
    plain = _run(small_chunks, "warm", prompt, SamplingParams(max_tokens=2, temperature=0.0))
    assert len(plain["tokens"]) == 2
    again = _run(small_chunks, "warm2", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert again["finished"].cached_tokens > 0  # the prefix is in the cache
    got = _run(small_chunks, "echo", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1))
    _check(got, _expected(reference, prompt), prompt, 1)
    assert got["finished"].cached_tokens == 0  # computed, never taken from the cache
    assert got["tokens"][:2] == plain["tokens"]  # and generation goes on after the prompt


def test_preempted_echo_requests_send_each_prompt_logprob_once(tiny_gguf: Path, reference) -> None:
    """A KV pool too small for all of them: a preempted request recomputes its prompt, whose
    logprobs were sent already; they must not come twice (nor go missing)."""
    probe = make_engine(tiny_gguf)
    plan = probe.ready_info["memory_plan"]
    probe.close()
    block_bytes = plan["kv_cache_bytes"] // plan["kv_blocks"]
    eng = make_engine(tiny_gguf, kv_cache_memory=14 * block_bytes, max_num_batched_tokens=32)
    rng = random.Random(9)
    prompts = {f"r{i}": [rng.randrange(1, 250) for _ in range(60)] for i in range(4)}
    try:
        assert eng.to_sched is not None and eng.from_sched is not None
        for rid, prompt in prompts.items():
            params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
            eng.to_sched.send(encode(SubmitRequest(rid, prompt, params, time.monotonic())))
        lps: dict[str, list[float]] = {rid: [] for rid in prompts}
        done: set[str] = set()
        deadline = time.monotonic() + 120
        while len(done) < len(prompts):
            assert time.monotonic() < deadline, "timed out"
            if not eng.from_sched.poll(100):
                continue
            msg = decode(eng.from_sched.recv())
            if isinstance(msg, OutputBatch):
                assert not msg.errors, msg.errors
                for d in msg.deltas:
                    lps[d.request_id] += d.prompt_logprobs or []
                done |= {f.request_id for f in msg.finished}
        st = stats(eng)
    finally:
        eng.close()
    assert st.preemptions > 0, "the pool was meant to be too small: nothing was preempted"
    for rid, prompt in prompts.items():
        ref = _expected(reference, prompt)
        np.testing.assert_allclose(lps[rid], ref[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
