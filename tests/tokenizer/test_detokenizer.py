"""Streaming detokenization equals full decoding and never shows half a character."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.tokenizer.detokenizer import IncrementalDetokenizer
from tandem.tokenizer.tokenizer import Tokenizer
from tandem.tokenizer.vocab_spelling import SPM_SPACE

REPLACEMENT = "\ufffd"

# Text with multi-byte characters that byte-level BPE splits across tokens.
_ALPHABET = [*"ab Z\n\t.éñ", "中", "文", "😀", "🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "  ", "<|im_end|>"]
texts = st.lists(st.sampled_from(_ALPHABET), max_size=40).map("".join)


def _stream(tok: Tokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    chunks = [detok.push(i) for i in ids]
    chunks.append(detok.flush())
    return chunks


@pytest.fixture(scope="module")
def smol(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts, st.booleans())
def test_stream_equals_decode_real_model(smol: Tokenizer, text: str, skip_special: bool) -> None:
    ids = smol.encode(text)
    chunks = _stream(smol, ids, skip_special=skip_special)
    assert "".join(chunks) == smol.decode(ids, skip_special=skip_special)
    if not skip_special:
        assert "".join(chunks) == text
    assert not any(REPLACEMENT in c for c in chunks)


@pytest.mark.slow
def test_emoji_is_held_until_complete(smol: Tokenizer) -> None:
    ids = smol.encode("😀")
    assert len(ids) > 1  # byte-level BPE spells it with several byte tokens
    chunks = _stream(smol, ids)
    assert chunks[:-2] == [""] * (len(ids) - 1)
    assert chunks[-2] == "😀" and chunks[-1] == ""


@pytest.mark.slow
def test_prompt_context(smol: Tokenizer) -> None:
    prompt = smol.encode("<|im_start|>assistant\n")
    gen = smol.encode(" Hello there")
    assert "".join(_stream(smol, gen, prompt_ids=prompt)) == " Hello there"


def test_does_not_redecode(smol_like: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # O(1) per token: push never decodes the sequence so far.
    def boom(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("full decode called")

    monkeypatch.setattr(smol_like, "decode", boom)
    monkeypatch.setattr(smol_like, "decode_bytes", boom)
    detok = IncrementalDetokenizer(smol_like)
    for i in smol_like.encode("hello é 😀 " * 50, add_bos=False):
        detok.push(i)
    detok.flush()


# --- a tiny SentencePiece vocab: byte fallback and the leading-space rule ----------------------


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    normal = [
        SPM_SPACE,
        "h",
        "e",
        "l",
        "o",
        SPM_SPACE + "h",
        "ll",
        "llo",
        SPM_SPACE + "he",
        SPM_SPACE + "hello",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + normal
    types = [2, 3, 3] + [6] * 256 + [1] * len(normal)
    scores = [0.0] * 259 + [-float(i) for i in range(len(normal))]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Tokenizer.from_gguf(path)


@pytest.fixture
def smol_like(spm: Tokenizer) -> Tokenizer:
    return spm


def test_spm_byte_fallback_emoji(spm: Tokenizer) -> None:
    ids = spm.encode("😀", add_bos=False)
    pieces = [spm.id_to_piece(i) for i in ids]
    assert pieces == [SPM_SPACE, "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # The prefix space is dropped at the start of the text, the emoji waits for its last byte.
    assert _stream(spm, ids) == ["", "", "", "", "😀", ""]


def test_spm_leading_space(spm: Tokenizer) -> None:
    ids = spm.encode("hello hello")
    assert spm.decode(ids, skip_special=True) == "hello hello"
    assert _stream(spm, ids) == ["", "hello", " hello", ""]
    # Unskipped BOS is text already, so the space is no longer at the start.
    assert "".join(_stream(spm, ids, skip_special=False)) == spm.decode(ids) == "<s> hello hello"
    # A continuation keeps its space: the prompt already produced text.
    prompt = spm.encode("hello")
    assert "".join(_stream(spm, spm.encode(" hello", add_bos=False)[1:], prompt_ids=prompt)) == " hello"


def test_unfinished_character_at_end_of_prompt(spm: Tokenizer) -> None:
    byte = {b: spm.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    prompt = [byte[b] for b in "ab😀".encode()[:-2]]
    detok = IncrementalDetokenizer(spm, prompt_ids=prompt)
    assert detok.push(byte[0x98]) == ""
    assert detok.pending
    assert detok.push(byte[0x80]) == "😀"
    assert detok.flush() == ""


def test_flush_reports_unfinished_bytes(spm: Tokenizer) -> None:
    detok = IncrementalDetokenizer(spm)
    assert detok.push(spm.piece_to_id("<0xE4>")) == ""
    assert detok.flush() == REPLACEMENT


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=268), max_size=30), st.booleans())
def test_any_ids_stream_equals_decode(spm: Tokenizer, ids: list[int], skip_special: bool) -> None:
    # Arbitrary ids make arbitrary (often invalid) UTF-8: replacement must match the full decode.
    chunks = _stream(spm, ids, skip_special=skip_special)
    assert "".join(chunks) == spm.decode(ids, skip_special=skip_special)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts)
def test_valid_text_never_shows_replacement(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text, add_bos=False)
    chunks = _stream(spm, ids)
    assert "".join(chunks) == spm.decode(ids)
    assert not any(REPLACEMENT in c for c in chunks)
