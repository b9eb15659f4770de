"""OutputProcessor: streamed text and stop decisions, token by token, as the scheduler loop calls it.

The tiny GGUF's tokenizer is byte-level (byte b is token 3 + b) with a few merges (" the", "re",
"at", ...), so a test can spell exactly which characters each token carries.

Run: python -m pytest tests/scheduler/test_output.py -q
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.formats.gguf_metadata import read_gguf_metadata
from tandem.formats.tiny import byte_unicode_table, write_tiny_gguf
from tandem.messages import SamplingParams
from tandem.scheduler.output import OutputProcessor, TokenEvent
from tandem.scheduler.sequence import Sequence
from tandem.tokenizer.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
EOS_IDS = (0, 2)  # <|endoftext|>, <|im_end|>
_seq_ids = itertools.count()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tok(tiny_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_path)


@pytest.fixture(scope="module")
def long_tok(tiny_path: Path) -> Tokenizer:
    """The tiny vocabulary plus "\\n" followed by 16 spaces as one token, as code vocabularies have."""
    meta = read_gguf_metadata(tiny_path)
    sp, nl = byte_unicode_table()[ord(" ")], byte_unicode_table()[ord("\n")]
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta["tokenizer.ggml.token_type"])
    merges = list(meta["tokenizer.ggml.merges"])
    for a, b in [(sp, sp), (sp * 2, sp * 2), (sp * 4, sp * 4), (sp * 8, sp * 8), (nl, sp * 16)]:
        tokens.append(a + b)
        types.append(1)  # NORMAL
        merges.append(f"{a} {b}")
    meta = {
        **meta,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    return Tokenizer.from_gguf_metadata(meta)


def ids(tok: Tokenizer, *pieces: str) -> list[int]:
    """One token per piece: each piece must be a single token of the vocabulary."""
    table = byte_unicode_table()
    out = []
    for p in pieces:
        i = tok.piece_to_id("".join(table[b] for b in p.encode()))
        assert i is not None, f"{p!r} is not one token"
        out.append(i)
    return out


def byte_ids(text: str) -> list[int]:
    return [3 + b for b in text.encode()]


@dataclass
class Stream:
    """Feeds tokens the way EngineCore._process_result does and keeps what the client saw."""

    out: OutputProcessor
    seq: Sequence
    text: str = ""
    events: list[TokenEvent] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # what the client had after each token

    def push(self, token: int) -> TokenEvent:
        assert self.finish is None, "pushed past the end"
        self.seq.token_ids.append(token)
        ev = self.out.on_token(self.seq, token)
        self.text += ev.text
        self.events.append(ev)
        self.seen.append(self.text)
        return ev

    def feed(self, tokens: list[int]) -> Stream:
        for t in tokens:
            if self.push(t).finish_reason:
                break
        return self

    @property
    def finish(self) -> tuple[str, str | int | None] | None:
        if self.events and self.events[-1].finish_reason:
            return self.events[-1].finish_reason, self.events[-1].stop_reason
        return None


def stream(
    tok: Tokenizer,
    *,
    prompt: str = "Q:",
    context_length: int = 4096,
    max_tokens: int = 1000,
    **params: object,
) -> Stream:
    p = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    prompt_ids = byte_ids(prompt)
    seq = Sequence(next(_seq_ids), "r", len(prompt_ids), prompt_ids, p, seed=0, max_tokens=max_tokens)
    return Stream(OutputProcessor(tok, context_length), seq)


# -- stop strings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "stop", "want"),
    [
        (["x", " the", "re", " ", "y"], "there", "x "),  # 2 tokens, the first only partly the stop
        (["a", "b", "E", "N", "D", "c"], "END", "ab"),  # 3 tokens, one character each
        (["c", "at", " the", "n"], "at the", "c"),  # 2 multi-character tokens
        (["w", "re", "at", "e", "d"], "eat", "wr"),  # starts inside a token, ends inside the next
        (["z", "on", "en", "d"], "nen", "zo"),  # both ends inside tokens
    ],
)
def test_stop_string_across_tokens_never_leaks(
    tok: Tokenizer, pieces: list[str], stop: str, want: str
) -> None:
    s = stream(tok, stop=[stop]).feed(ids(tok, *pieces))
    assert s.finish == ("stop", stop)
    assert s.text == want
    for seen in s.seen:  # not even a part of the stop string was shown on the way
        assert want.startswith(seen)


def test_text_that_only_looked_like_a_stop_is_released(tok: Tokenizer) -> None:
    s = stream(tok, stop=["ENDX"], max_tokens=6).feed(ids(tok, "a", "E", "N", "D", "b", "c"))
    assert s.seen == ["a", "a", "a", "a", "aENDb", "aENDbc"]
    assert s.finish == ("length", None)
    # the held prefix goes out at the very next token that rules the stop out, not later
    s = stream(tok, stop=["then"]).feed(ids(tok, "x", " the", "re"))
    assert s.seen == ["x", "x ", "x there"]


def test_held_text_is_flushed_when_the_sequence_ends_otherwise(tok: Tokenizer) -> None:
    s = stream(tok, stop=["END!"], max_tokens=3).feed(ids(tok, "a", "E", "N"))
    assert s.seen == ["a", "a", "aEN"] and s.finish == ("length", None)
    s = stream(tok, stop=["END!"]).feed([*ids(tok, "a", "E", "N"), 2])
    assert s.text == "aEN" and s.finish == ("stop", 2)


def test_overlapping_stop_candidates(tok: Tokenizer) -> None:
    # "aab": after "aa" + "a" the last two may still start it; the first one may not
    s = stream(tok, stop=["aab"]).feed(ids(tok, "x", "a", "a", "a", "a", "b", "y"))
    assert s.seen == ["x", "x", "x", "xa", "xaa", "xaa"]
    assert s.finish == ("stop", "aab")
    # two stop strings: the one that starts first wins
    s = stream(tok, stop=["cd", "bcde"]).feed(ids(tok, "a", "b", "c", "d", "e"))
    assert s.text == "ab" and s.finish == ("stop", "cd")


def test_stop_inside_one_long_token_is_found(long_tok: Tokenizer) -> None:
    """A token's text can be longer than the stop string plus slack: search all of it."""
    (indent,) = ids(long_tok, "\n" + " " * 16)
    s = stream(long_tok, stop=["\n"]).feed([*ids(long_tok, "a", "b"), indent, *ids(long_tok, "c")])
    assert s.finish == ("stop", "\n")
    assert s.text == "ab"
    s = stream(long_tok, stop=["\n  "]).feed([*ids(long_tok, "a"), indent])
    assert s.text == "a" and s.finish == ("stop", "\n  ")


_ALPHABET = "abE N\n"


def _visible(text: str, stops: list[str]) -> str:
    """The most of `text` a client may see: all but the longest tail that could still start a stop."""
    for cut in range(len(text) + 1):
        rest = text[cut:]
        if not rest or any(len(rest) < len(s) and s.startswith(rest) for s in stops):
            return text[:cut]
    raise AssertionError("unreachable")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(_ALPHABET, min_size=1, max_size=30),
    stops=st.lists(st.text(_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    bytewise=st.booleans(),
)
def test_stop_strings_random(tok: Tokenizer, text: str, stops: list[str], bytewise: bool) -> None:
    tokens = byte_ids(text) if bytewise else tok.encode(text)
    assert tok.decode(tokens) == text
    s = stream(tok, stop=stops, max_tokens=len(tokens)).feed(tokens)
    decoded = [tok.decode(tokens[: k + 1]) for k in range(len(tokens))]
    for k, seen in enumerate(s.seen):
        hits = sorted((decoded[k].find(x), x) for x in stops if x in decoded[k])
        if hits:  # the first token that completes a stop ends it, with nothing of the stop shown
            assert k == len(s.seen) - 1
            idx, x = hits[0]
            assert (seen, s.finish) == (decoded[k][:idx], ("stop", x))
        elif k < len(tokens) - 1:
            assert seen == _visible(decoded[k], stops)  # exactly what can no longer be a stop
        else:
            assert (seen, s.finish) == (text, ("length", None))


# -- stop tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", EOS_IDS)
def test_eos_stops_without_its_text(tok: Tokenizer, eos: int) -> None:
    s = stream(tok).feed([*ids(tok, "h", "i"), eos, *ids(tok, "x")])
    assert s.finish == ("stop", eos) and s.text == "hi" and len(s.events) == 3


def test_ignore_eos_keeps_going_until_max_tokens(tok: Tokenizer) -> None:
    s = stream(tok, ignore_eos=True, max_tokens=5).feed(
        [*ids(tok, "h"), 2, *ids(tok, "i"), 0, *ids(tok, "!")]
    )
    assert s.finish == ("length", None)
    assert s.text == "hi!"  # special tokens are skipped in text by default
    assert len(s.events) == 5
    s = stream(tok, ignore_eos=True, skip_special_tokens=False, max_tokens=3).feed([*ids(tok, "h"), 2, 2])
    assert s.text == "h<|im_end|><|im_end|>"


def test_stop_token_ids(tok: Tokenizer) -> None:
    (bang,) = ids(tok, "!")
    s = stream(tok, stop_token_ids=[bang]).feed(ids(tok, "h", "i", "!", "x"))
    assert s.finish == ("stop", bang) and s.text == "hi"
    # a stop token stops even when EOS is ignored, and releases held text
    s = stream(tok, stop_token_ids=[bang], ignore_eos=True, stop=["iz"]).feed(ids(tok, "h", "i", "!"))
    assert s.seen == ["h", "h", "hi"] and s.finish == ("stop", bang)


def test_max_tokens_and_context_give_length(tok: Tokenizer) -> None:
    s = stream(tok, max_tokens=3).feed(ids(tok, "a", "b", "c", "d"))
    assert (s.text, s.finish, len(s.events)) == ("abc", ("length", None), 3)
    # the context ends it first: the 2-token prompt plus 2 generated fills 4 positions
    s = stream(tok, prompt="Q:", context_length=4, max_tokens=100).feed(ids(tok, "a", "b", "c"))
    assert (s.text, s.finish, len(s.events)) == ("ab", ("length", None), 2)
    # a stop string completed by the last allowed token is a stop, not a length
    s = stream(tok, max_tokens=3, stop=["bc"]).feed(ids(tok, "a", "b", "c"))
    assert s.finish == ("stop", "bc") and s.text == "a"


# -- UTF-8 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["é", "€", "中", "😀"])
def test_multibyte_character_split_over_tokens_comes_out_whole(tok: Tokenizer, char: str) -> None:
    n = len(char.encode())
    s = stream(tok, max_tokens=n + 2).feed([*ids(tok, "a"), *byte_ids(char), *ids(tok, "b")])
    assert [e.text for e in s.events] == ["a"] + [""] * (n - 1) + [char, "b"]
    assert s.text == f"a{char}b" and REPLACEMENT not in s.text


def test_multibyte_stop_strings(tok: Tokenizer) -> None:
    s = stream(tok, stop=["é!"]).feed(byte_ids("aé!b"))
    assert s.text == "a" and s.finish == ("stop", "é!")
    assert all(REPLACEMENT not in seen for seen in s.seen)
    # an emoji held as a possible stop start is released whole when the stop fails to follow
    s = stream(tok, stop=["😀x"], max_tokens=20).feed(byte_ids("a😀y"))
    assert s.seen == ["a"] * 5 + ["a😀y"]


def test_release_forgets_the_stream(tok: Tokenizer) -> None:
    s = stream(tok, stop=["xyz"])
    s.feed(ids(tok, "a", "x"))
    assert s.seq.seq_id in s.out._streams
    s.out.release(s.seq)
    assert s.seq.seq_id not in s.out._streams
    s.out.release(s.seq)  # twice is fine (cancel after finish)
