"""Turn what a user sent (text or chat messages) into prompt token ids, the same way everywhere."""

from __future__ import annotations

from typing import Any

from tandem.models.chat_template import render_chat
from tandem.models.tokenizer import Tokenizer


def chat_prompt_text(tokenizer: Tokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    return render_chat(
        tokenizer.chat_template, messages, add_generation_prompt=True, bos_token=bos, eos_token=eos, **kwargs
    )


def prompt_ids(
    tokenizer: Tokenizer,
    prompt: str,
    raw: bool = False,
    system: str | None = None,
) -> list[int]:
    """A single user turn: through the chat template for chat models unless ``raw``."""
    if raw or not tokenizer.chat_template:
        return tokenizer.encode(prompt, parse_special=False)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return chat_ids(tokenizer, messages)


def chat_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    # The template writes its own control tokens (and BOS where it wants one): parse them, add none.
    return tokenizer.encode(
        chat_prompt_text(tokenizer, messages, **kwargs), add_bos=False, parse_special=True
    )
