"""Turn a GGUF vocabulary into a `tokenizers` backend that encodes as llama.cpp does.

Byte-level BPE (`gpt2`) vocabs get llama.cpp's pre-tokenizer regexes and the file's merges;
SentencePiece (`llama`) vocabs get a BPE whose merges are ranked by the vocab scores. Both also return
the fixed byte string each id decodes to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tandem.tokenizer.pretokenizers import PreTokenizerSpec
from tandem.tokenizer.special_tokens import _HIDDEN_TYPES, _SPECIAL_TYPES
from tandem.tokenizer.vocab_spelling import (
    _BYTE_TOKEN,
    SPM_SPACE,
    _byte_level_bytes,
    _byte_level_spelling,
    bytes_to_unicode,
)

logger = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The vocabulary cannot be turned into a tokenizer."""


def _added_tokens(tokens: list[str], types: list[int]) -> tuple[list[AddedToken], list[AddedToken]]:
    """(special, plain) added tokens: CONTROL/UNKNOWN match only with parse_special, USER_DEFINED always."""
    special, plain = [], []
    for text, ttype in zip(tokens, types, strict=True):
        if ttype in _HIDDEN_TYPES:
            special.append(AddedToken(text, special=True, normalized=False))
        elif ttype == TokenType.USER_DEFINED:
            plain.append(AddedToken(text, special=False, normalized=False))
    return special, plain


def _vocab_dict(keys: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in vocab:
            logger.warning("duplicate token %r (ids %d and %d); keeping the first", key, vocab[key], i)
            continue
        vocab[key] = i
    return vocab


def _build_byte_level(
    tokens: list[str], types: list[int], merges: list[str], spec: PreTokenizerSpec
) -> tuple[HFTokenizer, list[bytes]]:
    alphabet = set(bytes_to_unicode().values())
    keys, pieces = [], []
    for text, ttype in zip(tokens, types, strict=True):
        if ttype in _SPECIAL_TYPES:
            # Matched as added tokens on the raw text, so the vocab key is the raw text.
            keys.append(text)
            pieces.append(text.encode("utf-8"))
        elif ttype == TokenType.BYTE and _BYTE_TOKEN.fullmatch(text):
            keys.append(text)
            pieces.append(bytes([int(text[3:5], 16)]))
        elif ttype in (TokenType.UNUSED, 0):
            keys.append(text)
            pieces.append(b"")  # llama.cpp renders unused/undefined tokens as nothing
        else:
            keys.append(text if set(text) <= alphabet else _byte_level_spelling(text))
            pieces.append(_byte_level_bytes(text))
    vocab = _vocab_dict(keys)

    pairs = []
    dropped = 0
    for merge in merges:
        cut = merge.find(" ", 1)  # llama.cpp: the first space after the first character
        left, right = (merge[:cut], merge[cut + 1 :]) if cut > 0 else ("", "")
        if left in vocab and right in vocab and left + right in vocab:
            pairs.append((left, right))
        else:
            dropped += 1
    if dropped:
        logger.warning("dropped %d merges whose tokens are not in the vocab", dropped)

    backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _register_added(backend, tokens, types)
    return backend, pieces


def _spm_merges(tokens: list[str], types: list[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocab: every split of a token into two tokens, best score first.

    llama.cpp merges the adjacent pair whose concatenation has the highest score; a BPE merge list
    ranked the same way reproduces that.
    """
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty == TokenType.NORMAL}
    ranked = []
    for piece, pid in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[pid]), pid, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_sentencepiece(
    tokens: list[str],
    types: list[int],
    scores: Sequence[float],
    unk_text: str | None,
    add_space_prefix: bool,
) -> tuple[HFTokenizer, list[bytes]]:
    pieces = []
    for text, ttype in zip(tokens, types, strict=True):
        if ttype == TokenType.BYTE and _BYTE_TOKEN.fullmatch(text):
            pieces.append(bytes([int(text[3:5], 16)]))
        elif ttype in _SPECIAL_TYPES:
            pieces.append(text.encode("utf-8"))
        elif ttype == TokenType.NORMAL:
            pieces.append(text.replace(SPM_SPACE, " ").encode("utf-8"))
        else:
            pieces.append(b"")
    vocab = _vocab_dict(tokens)
    model = models.BPE(
        vocab=vocab,
        merges=_spm_merges(tokens, types, scores),
        unk_token=unk_text,
        fuse_unk=False,
        byte_fallback=True,
    )
    backend = HFTokenizer(model)
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        # A normalizer runs on every fragment between added tokens, which is where llama.cpp
        # prepends its space too (start of text and after each special token).
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])
    )
    _register_added(backend, tokens, types)
    return backend, pieces


def _register_added(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    special, plain = _added_tokens(tokens, types)
    before = backend.get_vocab_size(with_added_tokens=True)
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)
    if backend.get_vocab_size(with_added_tokens=True) != before:
        # An added token whose text is not a vocab key got a fresh id past the vocab: a broken file.
        raise TokenizerError("special tokens do not map onto the vocabulary (duplicate token texts?)")


def _build_wordpiece(
    tokens: list[str], types: list[int], unk_id: int | None
) -> tuple[HFTokenizer, list[bytes]]:
    """A WordPiece backend from llama.cpp's BERT vocab, whose converter rewrites Hugging Face's
    spelling to "phantom spaces": a word-initial piece gets a leading U+2581, a continuation
    loses its "##", bracketed specials stay as they are. Undone here, then encoded the way an
    uncased BERT folder is (BERT's normalizer: lower case, accents stripped, Chinese characters
    split; split at whitespace and punctuation), which is what llama.cpp's WPM tokenizer does."""
    if unk_id is None:
        raise TokenizerError("bert tokenizer without tokenizer.ggml.unknown_token_id")
    keys, pieces = [], []
    for text, ttype in zip(tokens, types, strict=True):
        if ttype in _SPECIAL_TYPES or (text.startswith("[") and text.endswith("]")):
            keys.append(text)
            pieces.append(text.encode("utf-8"))
        elif text.startswith(SPM_SPACE):
            keys.append(text[1:])
            pieces.append(b" " + text[1:].encode("utf-8"))
        else:
            keys.append("##" + text)
            pieces.append(text.encode("utf-8"))
    backend = HFTokenizer(models.WordPiece(vocab=_vocab_dict(keys), unk_token=keys[unk_id]))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    _register_added(backend, keys, types)
    return backend, pieces
