"""Replies whose text holds line separators (U+2028, U+2029, NEL) still parse in every client.

ollama-python reads NDJSON with httpx's iter_lines, which splits on whatever str.splitlines
splits on; a raw U+2028 inside a JSON string cut a line in two and the client raised
JSONDecodeError. The server escapes them in everything it writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import ollama
import pytest
from live_server import Server, register

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gateway.http.formats import json_text, ndjson, sse
from tandem.tokenizer.tokenizer import Tokenizer

BREAKERS = "\u2028\u2029\x85"
# What the looping model says, over and over. Its tokens must differ from each other: the model
# picks the next token from the last one alone.
LOOP = "\n\u2028b\x85"


@pytest.mark.parametrize("text", ["a\u2028b", "a\u2029b", "a\x85b", "\ud800", BREAKERS * 3])
def test_serialiser_escapes_line_breakers_and_lone_surrogates(text: str) -> None:
    obj = {"response": text}
    for data in (ndjson(obj), sse(obj), json_text(obj).encode()):
        decoded = data.decode("utf-8")  # a lone surrogate would not even encode
        assert not any(c in decoded for c in BREAKERS), decoded
        lines = [line for line in decoded.splitlines() if line]
        assert len(lines) == 1, lines
        assert json.loads(lines[0].removeprefix("data: ")) == obj


def write_looping_gguf(path: Path, text: str) -> Path:
    """A tiny model that, greedily, repeats ``text`` forever: with attention and MLP outputs at
    zero the last hidden state is the current token's embedding, and the output row of each
    token of ``text`` points at the embedding of the token before it (a bigram loop)."""
    write_tiny_gguf(path, TinySpec(tie_embeddings=False, context=512))
    ids = Tokenizer.from_gguf(path).encode(text, parse_special=False)
    assert len(set(ids)) == len(ids), "a bigram loop needs distinct tokens"
    reader = gguf.GGUFReader(path, "r+")
    tensors = {t.name: t.data for t in reader.tensors}
    for name, data in tensors.items():
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            data[...] = 0
    emb = np.array(tensors["token_embd.weight"])
    out = tensors["output.weight"]
    out[...] = 0
    for prev, nxt in zip(ids, ids[1:] + ids[:1], strict=True):
        out[nxt] = 20 * emb[prev] / np.linalg.norm(emb[prev])
    reader.data.flush()
    return path


@pytest.fixture(scope="module")
def looping_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("loop-home")
    register(home, write_looping_gguf(home / "loop.gguf", LOOP), "loop")
    server = Server(home, model="loop").start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


GREEDY = {"temperature": 0, "num_predict": 14}  # the loop twice: 7 tokens


def test_ollama_client_reads_streams_holding_line_separators(looping_server: Server) -> None:
    client = ollama.Client(host=looping_server.url, timeout=30)
    parts = list(client.generate(model="loop", prompt="\n", raw=True, stream=True, options=GREEDY))
    text = "".join(p.response for p in parts)
    assert parts[-1].done and "\u2028" in text and "\x85" in text, repr(text)
    assert text == (LOOP[1:] + LOOP[0]) * 2  # the model did what the test relies on
    # The chat template ends in "\n", where the loop starts too.
    chat = list(
        client.chat(model="loop", messages=[{"role": "user", "content": "hi"}], stream=True, options=GREEDY)
    )
    said = "".join(p.message.content or "" for p in chat)
    assert chat[-1].done and said.startswith(LOOP[1:]), repr(said)
    whole = client.generate(model="loop", prompt="\n", raw=True, options=GREEDY)
    assert whole.response == text


def test_raw_bytes_carry_escapes_not_separators(looping_server: Server) -> None:
    """What other clients (and proxies that split lines) see: escapes in NDJSON, SSE and JSON."""
    raw_breakers = [c.encode() for c in BREAKERS]
    requests = [
        ("/api/generate", {"model": "loop", "prompt": "\n", "raw": True, "options": GREEDY}),
        ("/api/generate", {"model": "loop", "prompt": "\n", "raw": True, "stream": False, "options": GREEDY}),
        (
            "/v1/completions",
            {"model": "loop", "prompt": "\n", "temperature": 0, "max_tokens": 14, "stream": True},
        ),
        ("/v1/completions", {"model": "loop", "prompt": "\n", "temperature": 0, "max_tokens": 14}),
    ]
    for path, body in requests:
        r = httpx.post(looping_server.url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert not any(b in r.content for b in raw_breakers), (path, r.content[:300])
        assert b"\\u2028" in r.content and b"\\u0085" in r.content, (path, r.content[:300])
