"""Text <-> token ids, built from a GGUF file's own vocabulary (or a Hugging Face tokenizer.json).

Encoding runs on the HF `tokenizers` library; the pipeline is assembled to reproduce llama.cpp
(`src/llama-vocab.cpp`), which is the reference for GGUF files:

* gpt2-style byte-level BPE: the pre-tokenizer regexes are chosen by `tokenizer.ggml.pre` and
  applied one after the other, each splitting the pieces left by the previous one and keeping the
  unmatched text as pieces of its own (tokenizers' `Split(..., behavior="isolated")`).
* SentencePiece-style `llama` vocab: BPE over the whole text with spaces written as U+2581, a space
  prepended to every text fragment that starts the input or follows a special token, merges ranked
  by the vocab scores, and byte-fallback tokens (`<0x0A>`) for characters not in the vocab.
* CONTROL / UNKNOWN tokens are matched in the text only when `parse_special` is set; USER_DEFINED
  tokens always are.

Decoding does not go through `tokenizers`: every id maps to a fixed byte string, so the text of a
sequence is the UTF-8 decoding of the concatenated bytes. That makes streaming detokenization exact
(see `detokenizer.py`).

The parts live next door: `pretokenizers.py` (llama.cpp's regexes), `special_tokens.py` (token types
and end-of-generation detection), `build.py` (GGUF vocab -> backend), `hf.py`
(Hugging Face folders) and `vocab_spelling.py` (how vocab entries spell bytes).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import Tokenizer as HFTokenizer

from tandem.formats.gguf_metadata import read_gguf_metadata
from tandem.tokenizer.build import TokenizerError, _build_byte_level, _build_sentencepiece, _build_wordpiece
from tandem.tokenizer.hf import tokenizer_from_hf_dir
from tandem.tokenizer.pretokenizers import PRE_TOKENIZERS
from tandem.tokenizer.special_tokens import _HIDDEN_TYPES, _detect_eog
from tandem.tokenizer.vocab_spelling import _byte_level_bytes

logger = logging.getLogger(__name__)


class Tokenizer:
    """A model's tokenizer. Thread-safe; build it with `from_gguf`, `from_gguf_metadata` or `from_hf_dir`."""

    def __init__(
        self,
        *,
        backend: HFTokenizer,
        tokens: list[str],
        token_types: list[int],
        piece_bytes: list[bytes],
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int],
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        strip_leading_space: bool = False,
        chat_template: str | None = None,
        model: str = "gpt2",
        pre: str = "default",
    ) -> None:
        if not (len(tokens) == len(token_types) == len(piece_bytes)):
            raise TokenizerError("tokens, token_types and piece_bytes differ in length")
        self._backend = backend
        # `encode_special_tokens` is a flag on the shared backend; set-and-encode must be atomic.
        self._lock = threading.Lock()
        self._tokens = tokens
        self._types = token_types
        self._pieces = piece_bytes
        self._visible = [
            b"" if t in _HIDDEN_TYPES else p for t, p in zip(token_types, piece_bytes, strict=True)
        ]
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._eos_ids = tuple(sorted(set(eos_ids)))
        self._eos_set = frozenset(self._eos_ids)
        self._pad_id = pad_id
        self._unk_id = unk_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        # SentencePiece vocabularies prepend a space when encoding; decoding takes it off again.
        self.strip_leading_space = strip_leading_space
        self.chat_template = chat_template
        self.model = model
        self.pre = pre

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_gguf_metadata(cls, fields: dict[str, Any]) -> Tokenizer:
        model = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not isinstance(model, str) or not tokens:
            raise TokenizerError("GGUF metadata has no tokenizer (tokenizer.ggml.model / tokens missing)")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        n = len(tokens)
        raw_types = fields.get("tokenizer.ggml.token_type")
        types = [int(t) for t in raw_types] if raw_types else [TokenType.NORMAL] * n
        if len(types) < n:
            raise TokenizerError(f"token_type has {len(types)} entries for {n} tokens")
        types = types[:n]

        def special_id(key: str, default: int | None) -> int | None:
            value = fields.get(f"tokenizer.ggml.{key}")
            if value is None:
                value = default
            if value is not None and not 0 <= int(value) < n:
                logger.warning("tokenizer.ggml.%s = %s is out of vocab range, ignoring it", key, value)
                return None
            return None if value is None else int(value)

        if model == "llama":
            # llama.cpp's defaults for SentencePiece files that leave the ids out.
            bos_id = special_id("bos_token_id", 1)
            eos_id = special_id("eos_token_id", 2)
            unk_id = special_id("unknown_token_id", 0)
            add_bos_default = True
            pre = "default"
        elif model == "gpt2":
            bos_id, eos_id = special_id("bos_token_id", None), special_id("eos_token_id", None)
            unk_id = special_id("unknown_token_id", None)
            pre = fields.get("tokenizer.ggml.pre") or "default"
            if pre not in PRE_TOKENIZERS:
                logger.warning("unknown pre-tokenizer %r; using llama.cpp's 'default' regexes", pre)
            add_bos_default = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"]).add_bos
        elif model == "bert":
            # WordPiece: every input is framed [CLS] ... [SEP], which play BOS and EOS (as for a
            # Hugging Face BERT folder). llama.cpp's converter writes them as cls/seperator ids.
            bos_id = special_id("cls_token_id", special_id("bos_token_id", None))
            eos_id = special_id("seperator_token_id", special_id("eos_token_id", None))
            unk_id = special_id("unknown_token_id", None)
            add_bos_default = True
            pre = "bert"
        else:
            raise TokenizerError(
                f"tokenizer model {model!r} is not supported "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece, 'bert' WordPiece)"
            )
        pad_id = special_id("padding_token_id", None)
        eos_ids = _detect_eog(fields, tokens, types, eos_id)
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", model == "bert"))
        if add_bos and bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true but there is no bos token")
        if add_eos and eos_id is None:
            raise TokenizerError("tokenizer.ggml.add_eos_token is true but there is no eos token")
        chat_template = fields.get("tokenizer.chat_template")

        if model == "gpt2":
            merges = fields.get("tokenizer.ggml.merges")
            if not merges:
                raise TokenizerError("gpt2 tokenizer without tokenizer.ggml.merges")
            spec = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
            backend, pieces = _build_byte_level(tokens, types, merges, spec)
            strip = False
        elif model == "bert":
            backend, pieces = _build_wordpiece(tokens, types, unk_id)
            strip = True
        else:
            scores = fields.get("tokenizer.ggml.scores") or [0.0] * n
            add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
            unk_text = tokens[unk_id] if unk_id is not None else None
            backend, pieces = _build_sentencepiece(tokens, types, scores, unk_text, add_space_prefix)
            strip = add_space_prefix

        tok = cls(
            backend=backend,
            tokens=tokens,
            token_types=types,
            piece_bytes=pieces,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            unk_id=unk_id,
            add_bos=add_bos,
            add_eos=add_eos,
            strip_leading_space=strip,
            chat_template=chat_template if isinstance(chat_template, str) else None,
            model=model,
            pre=pre,
        )
        logger.debug(
            "tokenizer %r: bos=%s eos=%s eog=%s add_bos=%s", tok, bos_id, eos_id, tok.eos_ids, add_bos
        )
        return tok

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json, plus tokenizer_config.json if present."""
        return tokenizer_from_hf_dir(cls, path)

    # --- properties -----------------------------------------------------------------------------

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (shared: do not change its settings)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: eos plus eot/eom/im_end-like tokens (llama.cpp's EOG set)."""
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._eos_set

    def is_special(self, token_id: int) -> bool:
        """Control-type token (CONTROL / UNKNOWN): what decode(skip_special=True) leaves out."""
        return self._types[token_id] in _HIDDEN_TYPES

    def token_type(self, token_id: int) -> TokenType:
        try:
            return TokenType(self._types[token_id])
        except ValueError:
            return TokenType.UNUSED

    def id_to_piece(self, token_id: int) -> str:
        """The token as the vocab spells it (byte-level characters, `▁` for spaces, `<0x0A>`)."""
        return self._tokens[token_id]

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes this token contributes to decoded text (may be part of a UTF-8 character)."""
        self._check_ids((token_id,))
        return (self._visible if skip_special else self._pieces)[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    # --- encode / decode ------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        parse_special: bool = True,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of `text`.

        `add_bos` / `add_eos` default to the model's flags. No second BOS is added when the text
        already starts with the BOS token (a chat template that writes it itself).
        `parse_special=False` encodes control tokens written in the text as plain text.
        """
        with self._lock:
            self._backend.encode_special_tokens = not parse_special
            ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_eos is None:
            add_eos = self.add_eos
        if add_bos and self._bos_id is not None:
            if ids and ids[0] == self._bos_id:
                logger.debug("text already starts with BOS; not adding another")
            else:
                ids.insert(0, self._bos_id)
        if add_eos and self._eos_id is not None:
            ids.append(self._eos_id)
        return ids

    @functools.cached_property
    def special_pattern(self) -> re.Pattern[str] | None:
        """What ``encode(parse_special=True)`` reads as control tokens: a regex of their texts,
        longest first (as the backend matches them), or None when the vocabulary has none."""
        texts = sorted(
            {t.content for t in self._backend.get_added_tokens_decoder().values() if t.special and t.content},
            key=len,
            reverse=True,
        )
        return re.compile("|".join(map(re.escape, texts))) if texts else None

    def encode_with_literals(self, text: str, literal_spans: Sequence[tuple[int, int]]) -> list[int]:
        """Token ids of ``text`` with control tokens parsed except inside ``literal_spans`` (sorted,
        disjoint ``(start, end)`` character ranges), whose control-token texts stay plain text. No
        BOS/EOS. Like the backend, it splits the text at the control tokens it parses and encodes
        the pieces between them without parsing."""
        pattern = self.special_pattern
        if pattern is None or not literal_spans:
            return self.encode(text, add_bos=False, add_eos=False, parse_special=pattern is not None)
        spans = iter(literal_spans)
        span = next(spans, None)
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            while span is not None and span[1] <= m.start():
                span = next(spans, None)
            if span is not None and span[0] < m.end():
                continue  # inside a literal span: plain text of the piece around it
            if m.start() > pos:
                ids += self.encode(text[pos : m.start()], add_bos=False, add_eos=False, parse_special=False)
            ids.append(self._backend.token_to_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:], add_bos=False, add_eos=False, parse_special=False)
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """The pieces BPE runs on separately (special tokens in the text are not looked for)."""
        pre = self._backend.pre_tokenizer
        if pre is None:
            return [text] if text else []
        pieces = [p for p, _ in pre.pre_tokenize_str(text)]
        if self.model == "gpt2":
            pieces = [_byte_level_bytes(p).decode("utf-8", errors="replace") for p in pieces]
        return pieces

    def decode_bytes(self, ids: Sequence[int], skip_special: bool = False) -> bytes:
        self._check_ids(ids)
        table = self._visible if skip_special else self._pieces
        data = b"".join([table[i] for i in ids])
        if self.strip_leading_space and data[:1] == b" ":
            data = data[1:]
        return data

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a sequence cut mid-character) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def _check_ids(self, ids: Sequence[int]) -> None:
        if len(ids) and (min(ids) < 0 or max(ids) >= len(self._pieces)):
            bad = next(i for i in ids if not 0 <= i < len(self._pieces))
            raise ValueError(f"token id {bad} is outside the vocabulary (size {len(self._pieces)})")

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"
