"""Embeddings through a real engine (scheduler + worker processes): BERT against transformers,
and embedding requests mixed into generation on the tiny llama in overlap mode."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pipeline_driver import make_engine, run_all, stats

from tandem.engine.process import EngineProcess
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.messages import EmbedRequest, OutputBatch, SamplingParams, SubmitRequest, decode, encode
from tandem.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "the quick brown fox",
    "embeddings map text to vectors",
    "hello world",
    "a small model for fast tests of the pipeline, with a longer input than the others",
    "fox",
]


def collect(engine: EngineProcess, rids: set[str], timeout: float = 60.0) -> dict:
    """rid -> {"tokens", "vector", "finished"} or the RequestError, checking exactly one terminal
    frame each, and that an embedding's vector comes before its Finished."""
    assert engine.from_sched is not None
    acc: dict[str, dict] = {rid: {"tokens": [], "vector": None} for rid in rids}
    done: dict = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(rids):
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        if not engine.from_sched.poll(100):
            continue
        msg = decode(engine.from_sched.recv())
        if not isinstance(msg, OutputBatch):
            continue
        for d in msg.deltas:
            assert d.request_id not in done
            acc[d.request_id]["tokens"] += d.token_ids
        for e in msg.embeddings:
            assert e.request_id not in done and acc[e.request_id]["vector"] is None
            acc[e.request_id]["vector"] = np.frombuffer(e.vector, dtype="<f4")
            assert len(acc[e.request_id]["vector"]) == e.dims
        for f in msg.finished:
            assert f.request_id not in done
            done[f.request_id] = {**acc[f.request_id], "finished": f}
        for err in msg.errors:
            assert err.request_id not in done
            done[err.request_id] = err
    return done


def embed_all(engine: EngineProcess, prompts: dict[str, list[int]], timeout: float = 60.0) -> dict:
    assert engine.to_sched is not None
    for rid, ids in prompts.items():
        engine.to_sched.send(encode(EmbedRequest(rid, ids, time.monotonic())))
    got = collect(engine, set(prompts), timeout)
    return {rid: r if not isinstance(r, dict) else (r["vector"], r["finished"]) for rid, r in got.items()}


def reference_bert(folder: Path, ids: list[int]) -> np.ndarray:
    """transformers' BertModel, mean pooling over the attention mask, L2-normalized."""
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0]
    v = h.mean(0)
    return (v / v.norm()).numpy()


def test_bert_matches_transformers_batched(tiny_bert: Path, no_leaks: None) -> None:
    tok = Tokenizer.from_hf_dir(tiny_bert)
    prompts = {f"r{i}": tok.encode(t) for i, t in enumerate(TEXTS)}
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids in prompts.values())  # [CLS] .. [SEP]
    engine = make_engine(tiny_bert)
    try:
        got = embed_all(engine, prompts)  # all five inputs in one step
    finally:
        engine.close()
    for rid, ids in prompts.items():
        vec, fin = got[rid]
        assert fin.prompt_tokens == len(ids) and fin.completion_tokens == 0
        np.testing.assert_allclose(vec, reference_bert(tiny_bert, ids), atol=1e-4)


def test_encoder_refuses_generation_and_long_inputs(tiny_bert: Path, no_leaks: None) -> None:
    engine = make_engine(tiny_bert)  # sentence_bert_config.json: 64 tokens at most
    try:
        out = run_all(engine, {"gen": ([2, 10, 3], SamplingParams(max_tokens=2))})
        assert out["gen"].error is not None and "does not support generate" in out["gen"].error.message
        got = embed_all(engine, {"long": [2] + [10] * 70 + [3], "ok": [2, 10, 3]})
        assert got["long"].code == "context_length" and "72 tokens" in got["long"].message
        assert got["ok"][1].finish_reason == "stop"
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinySpec(context=1024))


def test_mixed_queue_overlap_generations_equal_solo(tiny_llama: Path, no_leaks: None) -> None:
    """Embeddings interleaved with generations share the queue and the steps (overlap mode); the
    generations are token for token their solo runs, each embedding its solo embedding."""
    rng = np.random.default_rng(0)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    gens = {
        f"g{i}": ([1, *rng.integers(3, 200, 20 + i).tolist()], greedy if i % 2 else seeded) for i in range(6)
    }
    embeds = {f"e{i}": [1, *rng.integers(3, 200, 10 + 7 * i).tolist()] for i in range(6)}
    engine = make_engine(tiny_llama, overlap=True, max_num_batched_tokens=96)
    try:
        solo_gen = {rid: run_all(engine, {rid: req})[rid].token_ids for rid, req in gens.items()}
        solo_vec = {rid: embed_all(engine, {rid: ids})[rid][0] for rid, ids in embeds.items()}
        assert engine.to_sched is not None
        for (g, (prompt, params)), (e, ids) in zip(gens.items(), embeds.items(), strict=True):
            engine.to_sched.send(encode(SubmitRequest(g, prompt, params, time.monotonic())))
            engine.to_sched.send(encode(EmbedRequest(e, ids, time.monotonic())))
        mixed = collect(engine, set(gens) | set(embeds))
        st = stats(engine)
    finally:
        engine.close()
    for rid in gens:
        assert mixed[rid]["tokens"] == solo_gen[rid], rid
    for rid, v in solo_vec.items():
        assert v.shape == (64,) and abs(float(np.linalg.norm(v)) - 1.0) < 1e-5  # last token, normalized
        np.testing.assert_allclose(mixed[rid]["vector"], v, atol=1e-5)
        assert mixed[rid]["finished"].completion_tokens == 0
    # Embedding prompts never enter the prefix cache: the second round of identical inputs hit nothing.
    assert st.kv_blocks_used == 0
