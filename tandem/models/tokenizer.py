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
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tandem.models.gguf_metadata import read_gguf_metadata

logger = logging.getLogger(__name__)

SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# --- pre-tokenizer regexes, verbatim from llama.cpp's llm_tokenizer_bpe constructor ---------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp spells the case-insensitive contractions out; `(?i:...)` would also fold e.g. U+017F.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
    r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
# llama.cpp's std::regex has no \p{Lu}/\p{Ll}; it approximates them with "a letter that is not a-z"
# and "a letter that is not A-Z". We keep its approximation, since llama.cpp is the reference.
_UPPERISH = r"((?=[\p{L}])([^a-z]))"
_LOWERISH = r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_UNICODE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GRANITE_EMB_MULTI = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM = (
    "[\r\n]",
    # Cased letters; written as escapes because several (U+1F7D, U+2126, U+212A...) change under NFC.
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
    "]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
_DEEPSEEK3_MAIN = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3 = (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3_MAIN)
_SPARK2_5 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
    r"\p{N}",
)
_YOUTU = (
    r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
_CHAMELEON = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    _GPT2,
)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_EXAONE_MOE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5 = (
    r"\p{N}{1,3}",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_LLAMA_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family."""

    regexes: tuple[str, ...]
    # The word is looked up whole in the vocab before any merge (llama3 style).
    ignore_merges: bool = False
    # Default for `add_bos` before the file's own `tokenizer.ggml.add_bos_token` overrides it.
    add_bos: bool = False


def _family(names: str, spec: PreTokenizerSpec) -> dict[str, PreTokenizerSpec]:
    return dict.fromkeys(names.split(), spec)


PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": PreTokenizerSpec(_LLAMA_DEFAULT),
    **_family(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True),
    ),
    **_family("dbrx smaug-bpe glm4 chatglm-bpe", PreTokenizerSpec((_LLAMA3,))),
    "jais-2": PreTokenizerSpec((_JAIS2,)),
    "deepseek-llm": PreTokenizerSpec(_DEEPSEEK_LLM),
    "deepseek-coder": PreTokenizerSpec(_DEEPSEEK_CODER),
    **_family("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizerSpec(_DEEPSEEK3)),
    "spark2_5": PreTokenizerSpec(_SPARK2_5),
    "youtu": PreTokenizerSpec(_YOUTU, ignore_merges=True),
    "falcon": PreTokenizerSpec(_FALCON),
    # starcoder-like: every digit its own piece, then the gpt2 regex.
    **_family(
        "starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
        PreTokenizerSpec((r"\p{N}", _GPT2)),
    ),
    **_family(
        "gpt-2 gpt2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert"
        " jina-v1-en jina-v2-code roberta-bpe mpt olmo jais trillion granite-docling exaone4",
        PreTokenizerSpec((_GPT2,)),
    ),
    **_family(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open",
        PreTokenizerSpec((_QWEN2,)),
    ),
    "qwen35": PreTokenizerSpec((_QWEN35,)),
    **_family("poro-chat bloom gpt3-finnish", PreTokenizerSpec((_PORO,))),
    "viking": PreTokenizerSpec((_PORO, r"\p{N}")),
    "tekken": PreTokenizerSpec((_TEKKEN,), ignore_merges=True, add_bos=True),
    "chameleon": PreTokenizerSpec(_CHAMELEON, add_bos=True),
    **_family("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizerSpec((_GPT4O,))),
    "granite-embed-multi-97m": PreTokenizerSpec((_GRANITE_EMB_MULTI,), ignore_merges=True),
    **_family("tiny_aya cohere2moe", PreTokenizerSpec((r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O_UNICODE))),
    **_family("bailingmoe bailingmoe2 llada-moe", PreTokenizerSpec((_BAILINGMOE,))),
    "seed-coder": PreTokenizerSpec((_SEED_CODER,)),
    "grok-2": PreTokenizerSpec((_QWEN2,)),
    "ufakzeka": PreTokenizerSpec((_UFAKZEKA,)),
    "laguna": PreTokenizerSpec((r"[^\n]+|[\n]+", _QWEN2)),
    "exaone-moe": PreTokenizerSpec((_EXAONE_MOE,)),
    "minicpm5": PreTokenizerSpec(_MINICPM5, ignore_merges=True),
}

# --- end-of-generation detection, as llama.cpp does it (by token text) ----------------------------

_EOT_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    }
)
_EOM_TEXTS = frozenset({"<|eom_id|>"})
_FIM_PAD_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"})
_FIM_REP_TEXTS = frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"})
_FIM_SEP_TEXTS = frozenset({"<|file_sep|>"})
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Token types whose text decode(skip_special=True) drops, as llama.cpp's token_to_piece(special=False).
_HIDDEN_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED})


class TokenizerError(ValueError):
    """The vocabulary cannot be turned into a tokenizer."""


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
        else:
            raise TokenizerError(
                f"tokenizer model {model!r} is not supported "
                "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)"
            )
        pad_id = special_id("padding_token_id", None)
        eos_ids = _detect_eog(fields, tokens, types, eos_id)
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
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
        path = Path(path)
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        spec = json.loads(backend.to_str())

        vocab = backend.get_vocab(with_added_tokens=True)
        n = max(vocab.values()) + 1
        tokens = [f"[EMPTY_{i}]" for i in range(n)]
        for text, i in vocab.items():
            tokens[i] = text
        types = [int(TokenType.NORMAL)] * n
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        if byte_fallback:
            for i, text in enumerate(tokens):
                if _BYTE_TOKEN.fullmatch(text):
                    types[i] = TokenType.BYTE
        for i, added in backend.get_added_tokens_decoder().items():
            types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED

        decoder_types = _decoder_types(spec.get("decoder"))
        byte_level = "ByteLevel" in decoder_types
        spm_like = (
            "Metaspace" in decoder_types
            or "ByteFallback" in decoder_types
            or _replaces_spm_space(spec.get("decoder"))
        )
        pieces = []
        for i, (text, ttype) in enumerate(zip(tokens, types, strict=True)):
            if ttype in _SPECIAL_TYPES:
                pieces.append(text.encode("utf-8"))
            elif ttype == TokenType.BYTE:
                pieces.append(bytes([int(text[3:5], 16)]))
            elif byte_level:
                pieces.append(_byte_level_bytes(text))
            elif spm_like:
                pieces.append(text.replace(SPM_SPACE, " ").encode("utf-8"))
            else:
                # WordPiece and other decoders join pieces non-locally; per-token text is the best we have.
                pieces.append(backend.decode([i], skip_special_tokens=False).encode("utf-8"))

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return vocab.get(value) if isinstance(value, str) else None

        bos_id = token_id(config.get("bos_token"))
        eos_id = token_id(config.get("eos_token"))
        pad_id = token_id(config.get("pad_token"))
        unk_id = token_id(config.get("unk_token"))
        gen_config = _read_json(path / "generation_config.json")
        extra_eos = gen_config.get("eos_token_id")
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or [])
        eos_ids = _detect_eog({}, tokens, types, eos_id) | {i for i in extra_eos if 0 <= i < n}

        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is None or add_eos is None:
            # Llama 3 style files add BOS through the post-processor rather than a config flag.
            with_special = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            if add_bos is None:
                add_bos = bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id
            if add_eos is None:
                add_eos = eos_id is not None and len(with_special) > len(plain) and with_special[-1] == eos_id

        strip = _strips_leading_space(spec)
        return cls(
            backend=backend,
            tokens=tokens,
            token_types=types,
            piece_bytes=pieces,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            pad_id=pad_id,
            unk_id=unk_id,
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            strip_leading_space=strip,
            chat_template=_hf_chat_template(path, config),
            model="hf",
            pre="hf",
        )

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


# --- builders -----------------------------------------------------------------------------------


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


def _detect_eog(fields: dict[str, Any], tokens: list[str], types: list[int], eos_id: int | None) -> set[int]:
    """llama.cpp's end-of-generation set; also marks the tokens found as CONTROL, as llama.cpp does."""
    n = len(tokens)

    def key_id(key: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None and 0 <= int(value) < n else None

    found: dict[str, int | None] = {
        name: key_id(f"{name}_token_id") for name in ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")
    }
    by_text = {
        "eot": _EOT_TEXTS,
        "eom": _EOM_TEXTS,
        "fim_pad": _FIM_PAD_TEXTS,
        "fim_rep": _FIM_REP_TEXTS,
        "fim_sep": _FIM_SEP_TEXTS,
    }
    eog: set[int] = set()
    for i, text in enumerate(tokens):
        for name, texts in by_text.items():
            if found[name] is None and text in texts:
                found[name] = i
                _mark_control(types, i, text)
        if text in _EOG_TEXTS:
            eog.add(i)
            _mark_control(types, i, text)
    eog.update(
        i
        for i in (eos_id, found["eot"], found["eom"], found["fim_pad"], found["fim_rep"], found["fim_sep"])
        if i is not None
    )

    texts = {tokens[i]: i for i in eog}
    # gpt-oss / solar-open: "<|end|>" ends a message there, not the generation.
    if "<|end|>" in texts and (
        ("<|return|>" in texts and "<|call|>" in texts) or ("<|calls|>" in texts and "<|flush|>" in texts)
    ):
        eog.discard(texts["<|end|>"])
        types[texts["<|end|>"]] = TokenType.USER_DEFINED
    # gemma4 / paddleocr: "</s>" is ordinary text there.
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(texts["</s>"])
        types[texts["</s>"]] = TokenType.NORMAL
    return eog


def _mark_control(types: list[int], i: int, text: str) -> None:
    if types[i] != TokenType.CONTROL:
        logger.debug("control-looking token %d %r was not control-type; treating it as control", i, text)
        types[i] = TokenType.CONTROL


# --- Hugging Face folder helpers ----------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    out = {decoder.get("type", "")}
    for child in decoder.get("decoders") or []:
        out |= _decoder_types(child)
    return out


def _replaces_spm_space(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Replace" and (decoder.get("pattern") or {}).get("String") == SPM_SPACE:
        return True
    return any(_replaces_spm_space(child) for child in decoder.get("decoders") or [])


def _strips_leading_space(spec: dict[str, Any]) -> bool:
    def walk(dec: dict[str, Any] | None) -> bool:
        if not dec:
            return False
        if dec.get("type") == "Strip" and dec.get("content") == " " and int(dec.get("start", 0)) > 0:
            return True
        if dec.get("type") == "Metaspace":
            return dec.get("prepend_scheme", "always") != "never" and dec.get("add_prefix_space", True)
        return any(walk(child) for child in dec.get("decoders") or [])

    return walk(spec.get("decoder"))


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
