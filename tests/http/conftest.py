"""Fixtures: tiny random models in their own TANDEM_HOMEs, and a real server shared by the
tests that leave it as they found it. Helpers live in tests/live_server.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import TINY_CONTEXT, Server, register, tiny_home

from tandem.formats.tiny import TinySpec, write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", TinySpec(context=TINY_CONTEXT))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_gguf: Path):
    from tandem.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_gguf(tiny_gguf)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    """One server for the tests that leave it as they found it (ollama, OpenAI, metrics)."""
    server = Server(tiny_home(tmp_path_factory, tiny_gguf), args=("--allowed-host", "tandem.example")).start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


@pytest.fixture(scope="session")
def bert_server(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Iterator[Server]:
    """A server whose default model is the tiny random BERT (tests/tiny_bert.py), an encoder."""
    home = tmp_path_factory.mktemp("home")
    register(home, tiny_bert, "tiny-bert")
    server = Server(home, model="tiny-bert").start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]
