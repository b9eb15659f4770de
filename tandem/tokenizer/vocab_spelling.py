"""How vocabulary entries spell bytes: GPT-2's byte-level characters, SentencePiece's `▁`, `<0xNN>` tokens.

Decoding maps every token id to a fixed byte string; these helpers turn a vocab entry into those bytes,
and respell an entry a byte-level vocab stores as plain text so BPE can match it.
"""

from __future__ import annotations

import re
from functools import cache

SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@cache
def _unicode_to_latin1() -> dict[int, int]:
    # str.translate table: byte-level character -> the character whose code point is the byte,
    # so that `.encode("latin-1")` yields the raw bytes in one C-level pass.
    return {ord(ch): b for b, ch in bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    try:
        return token.translate(_unicode_to_latin1()).encode("latin-1")
    except UnicodeEncodeError:
        # Not byte-level spelled (a mislabelled token): its text is what it stands for.
        return token.encode("utf-8")


def _byte_level_spelling(text: str) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))
