"""Tokenizer built from GGUF metadata, checked against transformers and llama.cpp's rules."""

from __future__ import annotations

import heapq
import logging
import re
import time
from pathlib import Path
from typing import Any

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.errors import ModelFileError
from tandem.formats.gguf_metadata import metadata_from_reader, read_gguf_metadata
from tandem.tokenizer.build import TokenizerError
from tandem.tokenizer.tokenizer import Tokenizer
from tandem.tokenizer.vocab_spelling import SPM_SPACE, bytes_to_unicode

# Hard strings without digits: transformers' GGUF converter has no "smollm" entry and drops the
# individual-digit split, so it is a valid reference only where digits do not occur.
HARD_STRINGS = [
    "Hello world",
    "hello  world   with    runs",
    " leading space",
    "    four leading",
    "trailing space ",
    "trailing spaces   ",
    "   ",
    " ",
    "",
    "\n",
    "line\nbreaks\n\nand\r\nCRLF\r\n",
    "\ttab\tseparated\t\tvalues\t",
    "mixed \t \n whitespace \n\t ",
    "def f(x):\n    return x ** two  # comment\n",
    "if (a && b) { c[i] = d->e; }",
    "café naïve résumé Ångström façade",
    "Ελληνικά και Русский текст",
    "中文测试，你好！这是一个句子。",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "emoji 😀👍🏽 flags 🇫🇷 family 👨‍👩‍👧 heart ❤️",
    "I'm you're we'll it's they've he'd DON'T",
    "!!!???...,,,;;;",
    "http://example.com/path?q=x&r=y#frag",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>end",
    "<|im_start|><|im_start|>",
    "almost <|im_start but not quite|>",
    "Zero-width\u200bjoiner and\u00a0nbsp",
]

DIGIT_STRINGS = [
    "a 1",
    "a  1",
    "x   42 y",
    "12345",
    "3.14159 and 1,000,000",
    "x1y22z333",
    "  12",
    "version 2.0.1\n\n  3 items",
    "٣ arabic-indic and ５ fullwidth",
]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path)


@pytest.fixture(scope="module")
def hf_gguf(default_model_path: Path) -> Any:
    """transformers' own tokenizer for the GGUF file (offline, from the local file)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name
    )


@pytest.fixture(scope="module")
def hf_tokenizer_json(hf_gguf: Any) -> Any:
    """SmolLM2's published tokenizer.json pipeline: Digits(individual_digits) then ByteLevel's regex.

    Same vocab and merges as the GGUF; only the pre-tokenizer transformers drops is put back.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    tok = HFTokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tok


def _ids(tok: Tokenizer, *pieces: str) -> list[int]:
    """Ids of vocab pieces given as text ("  " -> "ĠĠ")."""
    table = bytes_to_unicode()
    out = []
    for piece in pieces:
        spelled = "".join(table[b] for b in piece.encode("utf-8"))
        token_id = tok.piece_to_id(spelled)
        assert token_id is not None, f"{piece!r} is not a single token"
        out.append(token_id)
    return out


# --- the real default model -------------------------------------------------------------------


@pytest.mark.slow
def test_metadata_facts(smol: Tokenizer) -> None:
    assert smol.model == "gpt2"
    assert smol.pre == "smollm"
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1
    assert smol.eos_id == 2
    # The GGUF says tokenizer.ggml.add_bos_token = false, and llama.cpp follows the file.
    assert smol.add_bos is False
    # llama.cpp's end-of-generation set: eos, "<|endoftext|>" by text, and "<reponame>" (its FIM-repo list).
    assert smol.eos_ids == (0, 2, 4)
    assert smol.id_to_piece(1) == "<|im_start|>"
    assert smol.is_special(1) and smol.is_special(2)
    assert not smol.is_special(_ids(smol, "Hello")[0])
    assert smol.chat_template is not None and "<|im_start|>" in smol.chat_template


@pytest.mark.slow
@pytest.mark.parametrize("text", HARD_STRINGS)
def test_matches_transformers_gguf_tokenizer(smol: Tokenizer, hf_gguf: Any, text: str) -> None:
    assert not re.search(r"\d", text)
    assert smol.encode(text, add_bos=False) == hf_gguf.encode(text, add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("text", HARD_STRINGS + DIGIT_STRINGS)
def test_matches_smollm2_tokenizer_json(smol: Tokenizer, hf_tokenizer_json: Any, text: str) -> None:
    assert smol.encode(text) == hf_tokenizer_json.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
def test_digits_are_split_individually_like_llama_cpp(smol: Tokenizer, hf_gguf: Any) -> None:
    # llama.cpp "smollm": regex \p{N} first, so "a  1" is "a  " + "1", and the gpt2 regex then
    # keeps the two trailing spaces together ("ĠĠ"); without the digit split it is "a", " ", " 1".
    assert smol.pre_tokenize("a  1") == ["a", "  ", "1"]
    assert smol.encode("a  1") == _ids(smol, "a", "  ", "1")
    assert hf_gguf.encode("a  1", add_special_tokens=False) == _ids(smol, "a", " ", " ", "1")
    assert smol.encode("12345") == _ids(smol, "1", "2", "3", "4", "5")
    # The spaces before a digit end their fragment, so all three stay one piece.
    assert smol.encode("x   42 y") == _ids(smol, "x", "   ", "4", "2", " y")
    assert smol.pre_tokenize("3.14") == ["3", ".", "1", "4"]


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from([*"ab Zé中😀🏽\n\t\r'’!?.,:;-_/<>|09٣", "<|im_start|>", "<|im_end|>", "  "]),
        max_size=40,
    ).map("".join)
)
def test_random_text_matches_reference(smol: Tokenizer, hf_tokenizer_json: Any, text: str) -> None:
    ids = smol.encode(text)
    assert ids == hf_tokenizer_json.encode(text, add_special_tokens=False).ids
    assert smol.decode(ids) == text


@pytest.mark.slow
def test_special_tokens_in_text(smol: Tokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = smol.encode(text)
    assert ids[0] == 1 and ids[-1] == 2
    plain = smol.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert smol.decode(plain) == text
    assert smol.decode(ids) == text
    assert smol.decode(ids, skip_special=True) == "user\nhi"


@pytest.mark.slow
def test_bos_handling(smol: Tokenizer) -> None:
    assert smol.encode("hi")[0] != smol.bos_id
    assert smol.encode("hi", add_bos=True)[0] == smol.bos_id
    # A prompt that already starts with BOS (written by a chat template) gets no second one.
    assert smol.encode("<|im_start|>hi", add_bos=True).count(smol.bos_id) == 1
    assert smol.encode("hi", add_eos=True)[-1] == smol.eos_id


@pytest.mark.slow
def test_decode_rejects_unknown_ids(smol: Tokenizer) -> None:
    with pytest.raises(ValueError):
        smol.decode([5, smol.vocab_size])
    with pytest.raises(ValueError):
        smol.decode([-1])


@pytest.mark.slow
def test_metadata_reader_is_fast_and_complete(default_model_path: Path) -> None:
    start = time.perf_counter()
    meta = read_gguf_metadata(default_model_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0  # ~0.15 s when the machine is idle; gguf.GGUFReader takes seconds
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.vocab_size"] == 49152
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.add_bos_token"] is False


# --- tiny hand-made vocabularies (fast) ---------------------------------------------------------


def _write_gguf(path: Path, arch: str, fields: dict[str, Any]) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(fields["model"])
    if "pre" in fields:
        w.add_tokenizer_pre(fields["pre"])
    w.add_token_list(fields["tokens"])
    w.add_token_types(fields["types"])
    if "scores" in fields:
        w.add_token_scores(fields["scores"])
    if "merges" in fields:
        w.add_token_merges(fields["merges"])
    for key, value in fields.get("ids", {}).items():
        getattr(w, f"add_{key}_token_id")(value)
    if "add_bos" in fields:
        w.add_add_bos_token(fields["add_bos"])
    w.add_chat_template("{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_NORMAL = [
    SPM_SPACE, "h", "e", "l", "o", "w", "r", "d", "a", "b", "c",
    SPM_SPACE + "h", "he", "ll", "lo", "llo", "hel", "hello", SPM_SPACE + "hello",
    SPM_SPACE + "w", "or", SPM_SPACE + "wor", "ld", SPM_SPACE + "world", SPM_SPACE * 2,
    "ab", "bc", "abc", SPM_SPACE + "a", "ca", "bca",
]  # fmt: skip


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_NORMAL
    tokens += ["<tool>", "<|im_end|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_NORMAL) + [4, 3]
    # Distinct scores: earlier pieces merge first.
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_NORMAL))] + [0.0, 0.0]
    return _write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        "llama",
        {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
         "ids": {"bos": 1, "eos": 2, "unk": 0}},
    )  # fmt: skip


@pytest.fixture(scope="module")
def spm(spm_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(spm_path)


def _spm_merge(fragment: str, score: dict[str, float]) -> list[str]:
    """llama.cpp's SPM merge loop: repeatedly join the adjacent pair with the best-scoring token."""
    syms = list(fragment)
    alive = [True] * len(syms)
    nxt = [*range(1, len(syms)), -1]
    prv = list(range(-1, len(syms) - 1))
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and syms[left] + syms[right] in score:
            merged = syms[left] + syms[right]
            heapq.heappush(heap, (-score[merged], left, right, merged))  # ties: leftmost first

    for i in range(len(syms) - 1):
        push(i, i + 1)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        if not (alive[left] and alive[right]) or syms[left] + syms[right] != merged:
            continue  # stale: one side has merged since
        syms[left] = merged
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    return [sym for sym, ok in zip(syms, alive, strict=True) if ok]


def _spm_reference(tok: Tokenizer, text: str, parse_special: bool = True) -> list[int]:
    """llama.cpp's SPM tokenizer (llm_tokenizer_spm_session + tokenize), written out independently."""
    vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    score = {SPM_NORMAL[i]: -float(i) for i in range(len(SPM_NORMAL))}
    specials = ["<s>", "</s>", "<unk>", "<|im_end|>"] if parse_special else []
    specials.append("<tool>")  # user-defined: always matched
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    out = [tok.bos_id]
    prev_special = True
    for part in re.split(pattern, text):
        if not part:
            continue
        if part in specials:
            out.append(vocab[part])
            prev_special = True
            continue
        fragment = ((" " if prev_special else "") + part).replace(" ", SPM_SPACE)
        prev_special = False
        for sym in _spm_merge(fragment, score):
            if sym in score:
                out.append(vocab[sym])
            else:
                out.extend(vocab[f"<0x{b:02X}>"] for b in sym.encode("utf-8"))
    # Our one deliberate difference: no second BOS when the text starts with one (llama.cpp warns).
    if out[1:2] == [tok.bos_id]:
        out.pop(0)
    return out


def test_spm_hand_checked(spm: Tokenizer) -> None:
    assert spm.model == "llama" and spm.add_bos
    assert spm.eos_ids == (2, spm.piece_to_id("<|im_end|>"))

    def pieces(ids: list[int]) -> list[str]:
        return [spm.id_to_piece(i) for i in ids]

    s = SPM_SPACE
    assert pieces(spm.encode("hello world")) == ["<s>", s + "h", "e", "llo", s + "world"]
    assert pieces(spm.encode("  hello", add_bos=False)) == [s + s, s + "h", "e", "llo"]
    # Not in the vocab: byte fallback, UTF-8 bytes.
    assert pieces(spm.encode("é\n", add_bos=False)) == [s, "<0xC3>", "<0xA9>", "<0x0A>"]
    # After a special or user-defined token the fragment gets the prefix space again.
    assert pieces(spm.encode("<s>hello</s>")) == ["<s>", s + "h", "e", "llo", "</s>"]
    # "ab" outscores "▁a", so it merges first.
    assert pieces(spm.encode("ab<tool>hello", add_bos=False)) == [s, "ab", "<tool>", s + "h", "e", "llo"]
    # parse_special=False: control tokens are text, user-defined ones are still matched.
    plain = pieces(spm.encode("<s>a<tool>", add_bos=False, parse_special=False))
    assert "<s>" not in plain and plain[-1] == "<tool>"


def test_spm_decode(spm: Tokenizer) -> None:
    ids = spm.encode("hello world")
    assert spm.decode(ids) == "<s> hello world"
    assert spm.decode(ids, skip_special=True) == "hello world"
    assert spm.decode(spm.encode("  hello\nworld é", add_bos=False)) == "  hello\nworld é"
    assert spm.decode(spm.encode("hello<|im_end|>")) == "<s> hello<|im_end|>"
    assert spm.token_bytes(spm.piece_to_id("<0x0A>")) == b"\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.sampled_from([*"helowrdabc é\n", "<s>", "</s>", "<tool>", "  "]), max_size=30).map("".join),
    st.booleans(),
)
def test_spm_matches_llama_cpp_algorithm(spm: Tokenizer, text: str, parse_special: bool) -> None:
    assert spm.encode(text, parse_special=parse_special) == _spm_reference(spm, text, parse_special)


@pytest.fixture(scope="module")
def byte_vocab_fields() -> dict[str, Any]:
    """A gpt2-style vocab of the 256 byte characters, two merges and ChatML control tokens."""
    table = bytes_to_unicode()
    tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        *[table[b] for b in range(256)],
        "Ġt",
        "Ġth",
        "Ġxy",
    ]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 259,
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{{ messages }}",
    }


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        # hand-derived from llama.cpp's regexes
        ("llama-bpe", "Hi 123456 it's\n\n  x", ["Hi", " ", "123", "456", " it", "'s", "\n\n", " ", " x"]),
        ("llama3", "I'M fine", ["I", "'M", " fine"]),
        ("qwen2", "ab 2024!!\n", ["ab", " ", "2", "0", "2", "4", "!!\n"]),
        ("smollm", "a  12b", ["a", "  ", "1", "2", "b"]),
        ("starcoder", "x=10", ["x", "=", "1", "0"]),
        ("gpt-2", "a  123  b", ["a", " ", " 123", " ", " b"]),
        ("default", "don't stop", ["don", "'", "t", " stop"]),
        ("deepseek-llm", "Hi 中文\n42", ["Hi", " ", "中文", "\n", "42"]),
    ],
)  # fmt: skip
def test_pre_tokenizer_regexes(
    byte_vocab_fields: dict[str, Any], pre: str, text: str, pieces: list[str]
) -> None:
    tok = Tokenizer.from_gguf_metadata({**byte_vocab_fields, "tokenizer.ggml.pre": pre})
    assert tok.pre_tokenize(text) == pieces
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_llama_bpe_defaults(byte_vocab_fields: dict[str, Any]) -> None:
    tok = Tokenizer.from_gguf_metadata(byte_vocab_fields)
    # llama-bpe adds BOS unless the file says otherwise (as llama.cpp)
    assert tok.add_bos and tok.encode(" th")[0] == 0
    assert tok.encode(" th", add_bos=False) == [tok.piece_to_id("Ġth")]
    assert tok.eos_ids == (0, 2)  # "<|endoftext|>" and "<|im_end|>" end generation
    no_bos = Tokenizer.from_gguf_metadata({**byte_vocab_fields, "tokenizer.ggml.add_bos_token": False})
    assert not no_bos.add_bos
    # llama3 looks a whole piece up before merging ("Ġxy" has no merge path); gpt-2 does not.
    assert tok.encode(" xy", add_bos=False) == [tok.piece_to_id("Ġxy")]
    gpt2 = Tokenizer.from_gguf_metadata({**byte_vocab_fields, "tokenizer.ggml.pre": "gpt-2"})
    assert gpt2.encode(" xy") == [gpt2.piece_to_id(p) for p in ("Ġ", "x", "y")]


def test_unknown_pre_tokenizer_warns(
    byte_vocab_fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tandem.tokenizer.tokenizer"):
        tok = Tokenizer.from_gguf_metadata({**byte_vocab_fields, "tokenizer.ggml.pre": "no-such-pre"})
    assert "no-such-pre" in caplog.text
    assert tok.pre_tokenize("don't 1234") == ["don", "'", "t", " ", "123", "4"]


def test_unsupported_model_raises(byte_vocab_fields: dict[str, Any]) -> None:
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({**byte_vocab_fields, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


def test_metadata_reader_matches_gguf_reader(spm_path: Path) -> None:
    ours = read_gguf_metadata(spm_path)
    theirs = metadata_from_reader(gguf.GGUFReader(spm_path))
    assert ours == theirs
    assert ours["tokenizer.ggml.tokens"][1] == "<s>"
    assert ours["tokenizer.ggml.scores"][259] == 0.0


def test_metadata_reader_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all, definitely not")
    with pytest.raises(ModelFileError):
        read_gguf_metadata(bad)


def test_from_hf_dir(tmp_path: Path, byte_vocab_fields: dict[str, Any]) -> None:
    import json

    src = Tokenizer.from_gguf_metadata(byte_vocab_fields)
    src.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "chat_template": "T",
                "add_bos_token": False,
            }
        )
    )
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template == "T"
    assert tok.bos_id == 0 and tok.eos_id == 2 and not tok.add_bos
    text = "<|im_start|>the thé 123<|im_end|>"
    assert tok.encode(text) == src.encode(text, add_bos=False)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special=True) == "the thé 123"


def test_from_hf_dir_sentencepiece(tmp_path: Path, spm: Tokenizer) -> None:
    spm.backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_hf_dir(tmp_path)  # no tokenizer_config.json at all
    assert tok.strip_leading_space
    text = "hello é\nworld"
    ids = tok.encode(text)
    assert ids == spm.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.is_special(tok.piece_to_id("<s>"))
    assert tok.token_bytes(tok.piece_to_id("<0xC3>")) == b"\xc3"
