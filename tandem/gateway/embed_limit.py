"""How long an embedding input may be, and how a longer one is cut: shared by the HTTP routes and
the ZeroMQ front end. An input runs whole in one step, so it holds at most min(context,
--max-num-batched-tokens) tokens; cut, it keeps an encoder's final [SEP] (the model frames every
input with it)."""

from __future__ import annotations

from typing import Any


def max_embed_tokens(engine: Any) -> int:
    return min(engine.context_length, engine.cfg.max_num_batched_tokens)


def cut_input(ids: list[int], limit: int, tokenizer: Any) -> list[int]:
    """``ids`` cut to ``limit`` tokens (returned as is when they fit)."""
    if len(ids) <= limit:
        return ids
    eos = tokenizer.eos_id if tokenizer.add_eos else None
    return [*ids[: limit - 1], ids[-1]] if eos is not None and ids[-1] == eos else ids[:limit]
