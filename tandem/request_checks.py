"""The rules a request must pass before it reaches the scheduler: one function and one message each.

They run once per request, in its front end: the engine client (`Router.submit`) for `generate`,
`bench` and the tests, or the gateway's HTTP and ZeroMQ front ends, which call them themselves
to name their own parameters and to clamp to the context (then they submit with ``checked``).
`SamplingParams.validate` is the sampling-parameter rule. The scheduler checks what it alone
knows: its KV pool (`Scheduler.check_feasible`, which also re-applies `fit_context` because its
ring's block tables hold no more than the context) and what its ring columns and the model's
embedding can hold (`Packer.check_params`, `Packer.check_prompt`): guards that keep a frame which
bypassed the engine client from failing anyone else's step.
"""

from __future__ import annotations

from typing import Any

from tandem.messages import ErrorCode, InvalidParameterError, SamplingParams


class ContextError(ValueError):
    """The prompt (and max_tokens) do not fit the context. ``param``: the field to blame, if one."""

    def __init__(self, message: str, code: str = ErrorCode.CONTEXT_LENGTH, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def check_prompt_ids(ids: list[Any], vocab_size: int, param: str = "prompt_token_ids") -> list[int]:
    """The ids as a list; InvalidParameterError naming ``param`` at the first that is no token id."""
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InvalidParameterError(param, f"token id {t!r} is not in 0..{vocab_size - 1}")
    return list(ids)


def fit_context(
    n_prompt: int, max_tokens: int | None, context_length: int, clamp: bool = False
) -> int | None:
    """max_tokens that fits the context; ContextError with both counts when the request does not.

    ``clamp``: shorten max_tokens to what fits (ollama) rather than refuse (OpenAI, vLLM).
    """
    ctx = context_length
    if n_prompt == 0:
        raise ContextError("the prompt is empty (0 tokens)", ErrorCode.INVALID_REQUEST, "prompt")
    if n_prompt >= ctx:
        raise ContextError(
            f"the prompt is {n_prompt} tokens, longer than the context of {ctx} tokens "
            "(prompt + at least 1 generated token must fit)"
        )
    room = ctx - n_prompt
    if max_tokens is None or max_tokens <= room:
        return max_tokens
    if clamp:
        return room
    raise ContextError(
        f"the context holds {ctx} tokens but the request needs {n_prompt + max_tokens} "
        f"({n_prompt} in the prompt, {max_tokens} to generate)",
        param="max_tokens",
    )


def check_request(ids: list[Any], params: SamplingParams, vocab_size: int, context_length: int) -> None:
    """Every rule, in the order a front end applies them: InvalidParameterError or ContextError."""
    if not isinstance(params, SamplingParams):
        raise InvalidParameterError("params", "must be a SamplingParams")
    params.validate()
    if not isinstance(ids, list):
        raise InvalidParameterError("prompt_token_ids", "must be a list of token ids")
    check_prompt_ids(ids, vocab_size)
    fit_context(len(ids), params.max_tokens, context_length)
