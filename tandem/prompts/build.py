"""Turn what a user sent (text or chat messages) into prompt token ids, the same way everywhere."""

from __future__ import annotations

import re
from typing import Any

from tandem.prompts.chat_template import render_chat
from tandem.tokenizer.tokenizer import Tokenizer


def chat_prompt_text(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], template: str | None = None, **kwargs: Any
) -> str:
    """The chat rendered by ``template`` (a derived model's own), else the tokenizer's."""
    bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    return render_chat(
        template or tokenizer.chat_template,
        messages,
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
        **kwargs,
    )


def prompt_ids(
    tokenizer: Tokenizer,
    prompt: str,
    raw: bool = False,
    system: str | None = None,
    special_in_content: bool = False,
    template: str | None = None,
) -> list[int]:
    """A single user turn: through the chat template for chat models unless ``raw``.

    A raw prompt is the model's input as the user wrote it, template markup included, so its
    control tokens are parsed (as ollama's ``raw`` does). A prompt without a template to put it
    in is user text like any message's content, so they are not.
    """
    if raw:
        return tokenizer.encode(prompt, parse_special=True)
    if not (template or tokenizer.chat_template):
        return tokenizer.encode(prompt, parse_special=special_in_content)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return chat_ids(tokenizer, messages, special_in_content=special_in_content, template=template)


# Stand-ins for control-token texts inside message content while the template renders: one
# character each from Supplementary Private Use Area-A, which no tokenizer gives a meaning to.
_SENTINEL_BASE = 0xF0000


def chat_ids(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], special_in_content: bool = False, **kwargs: Any
) -> list[int]:
    """The prompt ids of a chat. Only the template's own markup yields control tokens: text in the
    messages that spells one (``<|im_end|>``, ``<|start_header_id|>``) is encoded as the plain
    text it is, so a user cannot close their turn and write the system's. ``special_in_content``
    parses them anyway, as servers that tokenize the rendered text in one go do.

    Content is escaped before rendering (each control-token text becomes one private-use
    character, so templates that trim or test content see text of the same shape) and restored
    after; the restored spans are what encode_with_literals keeps as text. With no control-token
    text in the messages (the usual case) the ids are exactly those of tokenizing the rendered
    text with control tokens parsed, which is what transformers' apply_chat_template gives.
    """
    pattern = tokenizer.special_pattern
    if special_in_content or pattern is None:
        return tokenizer.encode(
            chat_prompt_text(tokenizer, messages, **kwargs), add_bos=False, parse_special=True
        )
    texts: list[str] = []
    escaped = [_escape(m, pattern, texts) for m in messages]
    rendered = chat_prompt_text(tokenizer, escaped, **kwargs)
    if not texts:  # the template writes its own control tokens (and BOS where it wants one)
        return tokenizer.encode(rendered, add_bos=False, parse_special=True)
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for part in _SENTINELS.split(rendered):
        if len(part) == 1 and _SENTINELS.fullmatch(part) and ord(part) - _SENTINEL_BASE < len(texts):
            literal = texts[ord(part) - _SENTINEL_BASE]
            spans.append((length, length + len(literal)))
            part = literal
        out.append(part)
        length += len(part)
    return tokenizer.encode_with_literals("".join(out), spans)


_SENTINELS = re.compile(f"([{chr(_SENTINEL_BASE)}-{chr(0xFFFFD)}])")


def _escape(value: Any, pattern: re.Pattern[str], texts: list[str]) -> Any:
    """``value`` (a message, or any part of one) with each control-token text in its strings
    replaced by a sentinel; ``texts`` collects what each sentinel stands for."""
    if isinstance(value, str):

        def sentinel(m: re.Match[str]) -> str:
            if m.group() not in texts:
                texts.append(m.group())
            return chr(_SENTINEL_BASE + texts.index(m.group()))

        return pattern.sub(sentinel, value)
    if isinstance(value, dict):
        return {k: (v if k == "role" else _escape(v, pattern, texts)) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v, pattern, texts) for v in value]
    return value
