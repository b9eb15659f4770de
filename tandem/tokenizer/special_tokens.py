"""Which tokens are special, and which end generation, decided as llama.cpp decides it.

llama.cpp recognises end-of-generation tokens by their text as well as by the ids the file names, and
treats the tokens it finds as CONTROL even when the file typed them otherwise; matching that here keeps
generation stopping where llama.cpp stops.
"""

from __future__ import annotations

import logging
from typing import Any

from gguf import TokenType

logger = logging.getLogger(__name__)

# Token types whose text decode(skip_special=True) drops, as llama.cpp's token_to_piece(special=False).
_HIDDEN_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})
# Token types matched whole in the raw text (as added tokens), so their vocab key is their raw text.
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED})

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
