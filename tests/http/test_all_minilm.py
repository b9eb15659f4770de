"""The catalogue's all-minilm against sentence-transformers on 20 mixed strings, through all three
embedding routes of a real server (float32 compute; the default dtype is bf16 on CPUs that have it)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from live_server import Server, register

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "¿Dónde está la biblioteca?",
    "東京は日本の首都です。",
    "Ünïcödé àccents and ligatures: ﬁ ﬂ",
    "1234567890 + 987654321 = 1111111111",
    "def f(x): return x ** 2  # python",
    "<html><body><p>markup</p></body></html>",
    "a",
    "",
    "   leading and trailing spaces   ",
    "emoji 🚀🔥 in text",
    "Retrieval-augmented generation combines search with language models.",
    "The mitochondria is the powerhouse of the cell.",
    "I like cats. I like dogs. I like " + "very " * 300 + "long sentences.",  # past 256 tokens: cut
    "SELECT * FROM users WHERE id = 42;",
    "Paris is the capital of France.",
    "naïve café résumé",
    "tab\tseparated\tvalues\nand a newline",
]


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tandem.store.model_store import ensure_model

    path = ensure_model("all-minilm").path  # `tandem pull all-minilm`, into the user's store
    home = tmp_path_factory.mktemp("home")
    register(home, path, "minilm")
    server = Server(home, model="minilm", args=("--max-num-batched-tokens", "2048")).start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_all_minilm_equals_sentence_transformers(minilm_server: Server) -> None:
    st = pytest.importorskip("sentence_transformers")
    from tandem.store.model_store import ensure_model

    ref = st.SentenceTransformer(str(ensure_model("all-minilm").path), device="cpu").encode(TEXTS)
    with httpx.Client(base_url=minilm_server.url, timeout=120) as c:
        embed = np.array(c.post("/api/embed", json={"model": "minilm", "input": TEXTS}).json()["embeddings"])
        legacy = np.array(
            [
                c.post("/api/embeddings", json={"model": "minilm", "prompt": t}).json()["embedding"]
                for t in TEXTS
                if t
            ]
        )
        body = c.post(
            "/v1/embeddings", json={"model": "minilm", "input": TEXTS, "encoding_format": "base64"}
        ).json()
    v1 = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    assert embed.shape == v1.shape == (20, 384)
    assert _cos(embed, ref).min() >= 0.9999
    assert _cos(v1, ref).min() >= 0.9999
    assert _cos(legacy, ref[[i for i, t in enumerate(TEXTS) if t]]).min() >= 0.9999
