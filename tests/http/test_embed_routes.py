"""The embedding routes through the official clients, on a real server: a tiny random BERT (an
encoder: embeddings only) checked against transformers, and the tiny llama (embeds and generates)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import Server, register

from tandem.tokenizer.tokenizer import Tokenizer

TEXTS = ["the quick brown fox", "hello world, this is tandem serving embeddings", "vectors"]


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    """transformers' BertModel, mean pooling, L2-normalized: what sentence-transformers computes."""
    import torch
    import transformers

    tok = Tokenizer.from_hf_dir(folder)
    model = transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    out = []
    for t in texts:
        with torch.no_grad():
            v = model(torch.tensor([tok.encode(t)])).last_hidden_state[0].mean(0)
        out.append((v / v.norm()).numpy())
    return np.stack(out)


def test_openai_embeddings_float_and_base64(bert_server: Server, tiny_bert: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=bert_server.url + "/v1", api_key="x")
    ref = reference(tiny_bert, TEXTS)
    got = client.embeddings.create(model="tiny-bert", input=TEXTS, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "tiny-bert"
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), ref, atol=1e-4)
    tok = Tokenizer.from_hf_dir(tiny_bert)
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(len(tok.encode(t)) for t in TEXTS)
    raw = httpx.post(
        bert_server.url + "/v1/embeddings",
        json={"model": "tiny-bert", "input": TEXTS[0], "encoding_format": "base64"},
    ).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, ref[0], atol=1e-4)
    # Without encoding_format the client asks for base64 itself and decodes it.
    b64 = client.embeddings.create(model="tiny-bert", input=TEXTS[1])
    np.testing.assert_allclose(np.asarray(b64.data[0].embedding, dtype=np.float32), ref[1], atol=1e-4)
    explicit = client.embeddings.create(model="tiny-bert", input=TEXTS[1], encoding_format="base64")
    assert isinstance(explicit.data[0].embedding, str)  # handed back as sent
    ids = client.embeddings.create(model="tiny-bert", input=[tok.encode(t) for t in TEXTS[:2]])
    np.testing.assert_allclose(np.array([d.embedding for d in ids.data]), ref[:2], atol=1e-4)
    short = client.embeddings.create(model="tiny-bert", input=TEXTS[0], dimensions=8, encoding_format="float")
    v = np.array(short.data[0].embedding)
    assert v.shape == (8,) and abs(np.linalg.norm(v) - 1) < 1e-5
    np.testing.assert_allclose(v, ref[0][:8] / np.linalg.norm(ref[0][:8]), atol=1e-4)


def test_ollama_embed_and_legacy_embeddings(bert_server: Server, tiny_bert: Path) -> None:
    import ollama

    client = ollama.Client(host=bert_server.url)
    ref = reference(tiny_bert, TEXTS)
    got = client.embed(model="tiny-bert", input=TEXTS)
    np.testing.assert_allclose(np.array(got.embeddings), ref, atol=1e-4)
    assert got.prompt_eval_count > 0 and got.total_duration > 0 and got.load_duration == 0
    one = client.embed(model="tiny-bert", input=TEXTS[2])
    np.testing.assert_allclose(np.array(one.embeddings[0]), ref[2], atol=1e-4)
    legacy = client.embeddings(model="tiny-bert", prompt=TEXTS[1])
    np.testing.assert_allclose(np.array(legacy.embedding), ref[1], atol=1e-4)


def test_truncate_and_refusals(bert_server: Server, tiny_bert: Path) -> None:
    long_text = " ".join(["fox"] * 100)  # 102 tokens with [CLS] and [SEP]; the folder says 64 at most
    with bert_server.client() as c:
        r = c.post("/api/embed", json={"model": "tiny-bert", "input": [long_text], "truncate": False})
        assert r.status_code == 400 and "102 tokens" in r.json()["error"] and "64" in r.json()["error"]
        r = c.post("/v1/embeddings", json={"model": "tiny-bert", "input": long_text, "truncate": False})
        assert r.status_code == 400 and "102 tokens" in r.json()["error"]["message"]
        cut = c.post("/api/embed", json={"model": "tiny-bert", "input": long_text}).json()
        assert cut["prompt_eval_count"] == 64
        tok = Tokenizer.from_hf_dir(tiny_bert)
        ids = tok.encode(long_text)
        same = c.post("/v1/embeddings", json={"model": "tiny-bert", "input": [*ids[:63], ids[-1]]}).json()
        np.testing.assert_allclose(cut["embeddings"][0], same["data"][0]["embedding"], atol=1e-5)
        r = c.post("/api/generate", json={"model": "tiny-bert", "prompt": "hi", "stream": False})
        assert r.status_code == 400
        assert r.json()["error"] == "model 'tiny-bert:latest' does not support generate"
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny-bert", "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 400 and "does not support generate" in r.json()["error"]["message"]
        show = c.post("/api/show", json={"model": "tiny-bert"}).json()
        assert show["capabilities"] == ["embedding"]
        assert c.post("/api/embed", json={"model": "tiny-bert", "input": []}).json()["embeddings"] == []


def test_generative_model_embeds_and_generates(tiny_server: Server) -> None:
    import openai

    with tiny_server.client() as c:
        show = c.post("/api/show", json={"model": "tiny"}).json()
        assert show["capabilities"] == ["completion", "embedding", "tools"]
        a = c.post("/api/embed", json={"model": "tiny", "input": ["hello there", "general kenobi"]}).json()
        assert len(a["embeddings"]) == 2 and len(a["embeddings"][0]) == 64
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in a["embeddings"])  # last token, normalized
        r = c.post(
            "/api/generate",
            json={"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
        )
        assert r.status_code == 200
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="x")
    b = client.embeddings.create(model="tiny", input=["hello there"], encoding_format="float")
    np.testing.assert_allclose(b.data[0].embedding, a["embeddings"][0], atol=1e-5)
    with pytest.raises(openai.NotFoundError):  # another model is a 404, as for generation
        client.embeddings.create(model="other", input="x")


def test_a_model_that_does_not_embed_is_a_400(bert_server: Server, tmp_path: Path) -> None:
    """A reranker GGUF (pooling_type 4, rank) generates but gives no embedding: the 400 on every
    embedding route and through both clients, and /api/show leaves "embedding" out."""
    import ollama
    import openai

    from tandem.formats.tiny import TinySpec, write_tiny_gguf

    register(bert_server.home, write_tiny_gguf(tmp_path / "rank.gguf", TinySpec(pooling_type=4)), "tiny-rank")
    with bert_server.client() as c:
        assert c.post("/api/show", json={"model": "tiny-rank"}).json()["capabilities"] == [
            "completion",
            "tools",
        ]
        for path, body in [
            ("/api/embed", {"input": "x"}),
            ("/api/embeddings", {"prompt": "x"}),
            ("/v1/embeddings", {"input": "x"}),
        ]:
            r = c.post(path, json={"model": "tiny-rank", **body})
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert (
                err if path.startswith("/api") else err["message"]
            ) == "model 'tiny-rank' does not support embeddings"
        gen = c.post(
            "/api/generate",
            json={"model": "tiny-rank", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
        )
        assert gen.status_code == 200
    with pytest.raises(ollama.ResponseError, match="does not support embeddings") as e:
        ollama.Client(host=bert_server.url).embed(model="tiny-rank", input="x")
    assert e.value.status_code == 400
    client = openai.OpenAI(base_url=bert_server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model="tiny-rank", input="x")
