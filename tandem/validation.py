"""The rules a request must meet, checked once, in its front end; one function and one message each.

They run in the engine client (`Router.submit`) for `generate`, `bench` and the tests, or in the
gateway's HTTP and ZeroMQ front ends, which call them themselves to name their own parameters and
to clamp to the context (then they submit with ``checked``). The message types (messages.py) only
carry values; this module says which are accepted. Every bound is one the ring's column can hold
(int32 counts and top_k, float32 knobs, 64-bit seeds), so a request that passes can never fail
while its step is packed; the stop caps keep one request from slowing every other one's
detokenization (each stop string is searched for after every token).

The scheduler checks only what it alone knows: its KV pool (`Scheduler.check_feasible`, which
re-applies `fit_context` because the ring's block tables hold no more than the context) and what
its ring columns and the model's embedding can hold (`Packer.check_params`, `Packer.check_prompt`):
guards that keep a frame which bypassed the engine client from failing anyone else's step.
"""

from __future__ import annotations

import math
from typing import Any

from tandem.messages import ChatMessage, ErrorCode, GenerateRequest, SamplingParams

INT32_MAX = 2**31 - 1
MAX_REQUEST_ID_LEN = 256
MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_STOP = 16
MAX_STOP_CHARS = 4096
MAX_STOP_TOKEN_IDS = 64
# Structured output: "" is unconstrained; the grammar text is a JSON schema (as JSON), a regex, or
# a Lark or GBNF grammar ("json" takes none).
GRAMMAR_KINDS = ("", "json", "json_schema", "regex", "lark", "gbnf")
MAX_GRAMMAR_CHARS = 1 << 20


class InvalidParameterError(ValueError):
    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"invalid parameter '{param}': {reason}")
        self.param = param


def validate_sampling(params: SamplingParams) -> None:
    """Raise InvalidParameterError naming the first bad field of ``params``."""
    if params.prompt_logprobs is not None:
        _int("prompt_logprobs", params.prompt_logprobs, 0, MAX_TOP_LOGPROBS)
    if params.max_tokens is not None:
        # 0: the prompt's logprobs alone (echo), no generated token
        _int("max_tokens", params.max_tokens, 0 if params.prompt_logprobs is not None else 1, INT32_MAX)
    _finite("temperature", params.temperature, 0.0, MAX_TEMPERATURE)
    _int("top_k", params.top_k, -INT32_MAX - 1, INT32_MAX)
    _finite("top_p", params.top_p, 0.0, 1.0, lo_open=True)
    _finite("min_p", params.min_p, 0.0, 1.0)
    _finite("repetition_penalty", params.repetition_penalty, 0.0, MAX_REPETITION_PENALTY, lo_open=True)
    _finite("presence_penalty", params.presence_penalty, -2.0, 2.0)
    _finite("frequency_penalty", params.frequency_penalty, -2.0, 2.0)
    if params.seed is not None:
        _int("seed", params.seed, -(2**63), 2**64 - 1)
    _validate_stops(params)
    if params.logprobs is not None:
        _int("logprobs", params.logprobs, 0, MAX_TOP_LOGPROBS)
    _bool("ignore_eos", params.ignore_eos)
    _bool("return_logits", params.return_logits)
    _bool("skip_special_tokens", params.skip_special_tokens)
    if params.grammar_kind not in GRAMMAR_KINDS:
        raise InvalidParameterError("grammar_kind", f"must be one of {GRAMMAR_KINDS}")
    _text("grammar", params.grammar)
    if len(params.grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidParameterError("grammar", f"longer than {MAX_GRAMMAR_CHARS} characters")
    if params.grammar_kind not in ("", "json") and not params.grammar:
        raise InvalidParameterError("grammar", f"grammar_kind {params.grammar_kind!r} needs a grammar")


def validate_request(req: GenerateRequest, vocab_size: int | None = None) -> None:
    """Raise InvalidParameterError naming the first bad field of ``req`` (request_id is checked first)."""
    rid = req.request_id
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID_LEN:
        raise InvalidParameterError("request_id", f"must be a string of 1..{MAX_REQUEST_ID_LEN} chars")
    given = [n for n in ("prompt", "prompt_token_ids", "messages") if getattr(req, n) is not None]
    if len(given) != 1:
        raise InvalidParameterError(
            "prompt", f"give exactly one of prompt, prompt_token_ids, messages (got {given or 'none'})"
        )
    if req.prompt is not None and not isinstance(req.prompt, str):
        raise InvalidParameterError("prompt", "must be a string")
    if req.prompt_token_ids is not None:
        _validate_prompt_ids(req.prompt_token_ids, vocab_size)
    if req.messages is not None:
        _validate_messages(req.messages)
    if not isinstance(req.raw, bool):
        raise InvalidParameterError("raw", "must be a boolean")
    if req.raw and req.prompt is None:
        raise InvalidParameterError("raw", "applies only to prompt")
    if req.system is not None and (not isinstance(req.system, str) or req.prompt is None):
        raise InvalidParameterError("system", "must be a string, and applies only to prompt")
    if not isinstance(req.stream, bool):
        raise InvalidParameterError("stream", "must be a boolean")
    if req.tools is not None and (not isinstance(req.tools, list) or req.messages is None):
        raise InvalidParameterError("tools", "must be a list of tools, and applies only to messages")
    if not isinstance(req.params, SamplingParams):
        raise InvalidParameterError("params", "must be a SamplingParams")
    validate_sampling(req.params)


def _validate_prompt_ids(ids: Any, vocab_size: int | None) -> None:
    if not isinstance(ids, list) or not ids:
        raise InvalidParameterError("prompt_token_ids", "must be a non-empty list of token ids")
    if vocab_size is not None:
        check_prompt_ids(ids, vocab_size)
        return
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InvalidParameterError("prompt_token_ids", f"token id {t!r} is not a token id")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of chat messages")
    for m in messages:
        if not isinstance(m, ChatMessage) or not isinstance(m.role, str) or not m.role:
            raise InvalidParameterError("messages", "each message needs a non-empty string role")
        if not isinstance(m.content, str):
            raise InvalidParameterError("messages", "each message content must be a string")


def _validate_stops(params: SamplingParams) -> None:
    stop = params.stop
    if not isinstance(stop, list):
        raise InvalidParameterError("stop", "must be a list of non-empty strings")
    if len(stop) > MAX_STOP:
        raise InvalidParameterError("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    for s in stop:
        _text("stop", s)
        if not s:
            raise InvalidParameterError("stop", "must be a list of non-empty strings")
    total = sum(map(len, stop))
    if total > MAX_STOP_CHARS:
        raise InvalidParameterError(
            "stop", f"stop strings total {total} characters, more than the limit of {MAX_STOP_CHARS}"
        )
    ids = params.stop_token_ids
    if not isinstance(ids, list):
        raise InvalidParameterError("stop_token_ids", "must be a list of token ids")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidParameterError(
            "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(ids)}"
        )
    for t in ids:
        _int("stop_token_ids", t, 0, INT32_MAX)


def _finite(
    name: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidParameterError(name, f"must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise InvalidParameterError(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidParameterError(name, f"must be <= {hi}, got {v}")


def _int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidParameterError(name, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise InvalidParameterError(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidParameterError(name, f"must be <= {hi}, got {v}")


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise InvalidParameterError(name, f"must be true or false, got {v!r}")


def _text(name: str, v: Any) -> None:
    if not isinstance(v, str):
        raise InvalidParameterError(name, f"must be a string, got {type(v).__name__}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameterError(name, "is not valid Unicode (lone surrogate)") from None


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
    validate_sampling(params)
    if not isinstance(ids, list):
        raise InvalidParameterError("prompt_token_ids", "must be a list of token ids")
    check_prompt_ids(ids, vocab_size)
    fit_context(len(ids), params.max_tokens, context_length)
