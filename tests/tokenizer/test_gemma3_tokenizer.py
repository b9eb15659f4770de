"""Gemma 3's SentencePiece vocabulary (262,144 tokens) from the real gemma3:270m GGUF encodes as
transformers' tokenizer built from the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_tokenizer import DIGIT_STRINGS, HARD_STRINGS

from tandem.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

GEMMA_STRINGS = [
    "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a written bos",
    "12345 3.14159 1,000,000 2024-01-31",
    "    indented\n\n\n\nnewlines\t\t",
    "<unused0> <table><tr><td>cell</td></tr></table>",
    "almost <start_of_turn but not quite>",
]


@pytest.fixture(scope="module")
def gemma(gemma3_model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_model_path)


@pytest.fixture(scope="module")
def hf_gemma(gemma3_model_path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(
        str(gemma3_model_path.parent), gguf_file=gemma3_model_path.name
    )


@pytest.mark.parametrize("text", HARD_STRINGS + DIGIT_STRINGS + GEMMA_STRINGS)
def test_matches_transformers_gguf_tokenizer(gemma: Tokenizer, hf_gemma: Any, text: str) -> None:
    assert gemma.encode(text, add_bos=False) == hf_gemma.encode(text, add_special_tokens=False)


def test_vocab_bos_and_round_trip(gemma: Tokenizer, hf_gemma: Any) -> None:
    assert gemma.vocab_size == 262_144
    assert gemma.encode("Hello world") == hf_gemma.encode("Hello world")  # <bos> first, as the file says
    for text in GEMMA_STRINGS:
        assert gemma.decode(gemma.encode(text, add_bos=False)) == text
