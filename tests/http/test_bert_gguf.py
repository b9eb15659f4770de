"""BERT GGUF files as llama.cpp's converter writes them (tests/tiny_bert.py writes one from the tiny
random BERT folder): the WordPiece vocab tokenizes as the folder's tokenizer.json does, and the
file, pulled with `tandem pull ./file.gguf` into a running server's store, embeds as the folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from live_server import Server
from tiny_bert import write_tiny_bert_gguf

from tandem.tokenizer.tokenizer import Tokenizer

TEXTS = ["The Quick brown fox!", "hello world, this is tandem serving embeddings", "Café naïve zebra", "x"]


@pytest.fixture(scope="module")
def bert_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    return write_tiny_bert_gguf(tiny_bert, tmp_path_factory.mktemp("gguf") / "tinybert.gguf")


def pull(server: Server, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", "pull", f"./{path.name}"],
        cwd=path.parent,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_wordpiece_vocab_tokenizes_as_the_folder(bert_gguf: Path, tiny_bert: Path) -> None:
    gguf_tok, hf_tok = Tokenizer.from_gguf(bert_gguf), Tokenizer.from_hf_dir(tiny_bert)
    for text in [*TEXTS, "[CLS] inside", "unknownword ###"]:
        for special in (True, False):
            assert gguf_tok.encode(text, parse_special=special) == hf_tok.encode(text, parse_special=special)
    assert (gguf_tok.bos_id, gguf_tok.eos_id) == (hf_tok.bos_id, hf_tok.eos_id)  # [CLS], [SEP]
    ids = gguf_tok.encode("hello world, fox", parse_special=False)
    assert gguf_tok.decode(ids, skip_special=True) == "hello world , fox"


def test_pulled_gguf_embeds_as_the_folder(bert_server: Server, bert_gguf: Path) -> None:
    done = pull(bert_server, bert_gguf)
    assert done.returncode == 0, done.stderr
    with bert_server.client() as c:
        want = c.post("/api/embed", json={"model": "tiny-bert", "input": TEXTS}).json()["embeddings"]
        got = c.post("/api/embed", json={"model": "tinybert", "input": TEXTS}).json()
        np.testing.assert_allclose(got["embeddings"], want, atol=1e-4)
        assert got["prompt_eval_count"] == sum(len(Tokenizer.from_gguf(bert_gguf).encode(t)) for t in TEXTS)
        v1 = c.post("/v1/embeddings", json={"model": "tinybert", "input": TEXTS[1]}).json()
        np.testing.assert_allclose(v1["data"][0]["embedding"], want[1], atol=1e-4)
        assert c.post("/api/show", json={"model": "tinybert"}).json()["capabilities"] == ["embedding"]
        r = c.post("/api/generate", json={"model": "tinybert", "prompt": "hi", "stream": False})
        assert r.status_code == 400 and "does not support generate" in r.json()["error"]


@pytest.mark.parametrize(("pooling", "named"), [(4, "4"), (0, "0"), (9, "9")])
def test_unknown_pooling_type_is_refused(
    bert_server: Server, tiny_bert: Path, tmp_path: Path, pooling: int, named: str
) -> None:
    """0 (none: a vector a token) and 4 (rank: a reranker's score) give no one vector an input."""
    done = pull(bert_server, write_tiny_bert_gguf(tiny_bert, tmp_path / f"pool{pooling}.gguf", pooling))
    assert done.returncode == 0, done.stderr  # a sound file: the store takes it, loading refuses it
    with bert_server.client() as c:
        r = c.post("/api/embed", json={"model": f"pool{pooling}", "input": "x"})
    # As for any model the worker cannot load (an unknown architecture): a 500 naming why.
    assert r.status_code == 500
    assert f"BERT pooling type '{named}' (bert.pooling_type) is not supported" in r.json()["error"]
