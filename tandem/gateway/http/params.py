"""Request bodies -> validated values and SamplingParams, with 400s that name the client's parameter.

Type checks happen here, with the name the client used (``num_predict``, ``repeat_penalty``),
before validate_sampling() checks ranges; its errors are renamed back the same way.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from starlette.requests import Request

from tandem.gateway.http.errors import ApiError
from tandem.messages import SamplingParams
from tandem.validation import MAX_TOP_LOGPROBS, InvalidParameterError, validate_sampling

log = logging.getLogger(__name__)

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads joins valid pairs into one character

# ollama options tandem does not implement; accepted and ignored (they tune ollama's runner).
_OLLAMA_IGNORED = frozenset(
    "num_keep typical_p repeat_last_n penalize_newline numa num_batch num_gpu main_gpu use_mmap "
    "num_thread low_vram f16_kv vocab_only use_mlock tfs_z mirostat mirostat_tau mirostat_eta "
    "num_gqa rope_frequency_base rope_frequency_scale draft_num_predict".split()
)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON in request body: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON in request body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    check_text(body)
    return body


def bad(param: str, reason: str) -> ApiError:
    return ApiError(400, f"invalid parameter '{param}': {reason}", param=param, code="invalid_parameter")


def _field(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _lone_surrogate(param: str, text: str, what: str = "contains") -> None:
    if m := _LONE_SURROGATE.search(text):
        raise bad(param, f"{what} a lone surrogate (\\u{ord(m.group()):04x}), which is not Unicode text")


def check_text(body: dict[str, Any]) -> None:
    """Refuse a lone surrogate anywhere in a request body, naming its field ('messages[0].content').

    JSON can spell one ("\\ud800") and json.loads keeps it, but it cannot be encoded as UTF-8,
    so it would fail later in the tokenizer, a template or a response. Checking the whole body
    once covers every string a route reads, including those passed through to chat templates.
    """
    stack: list[tuple[str, dict[str, Any] | list[Any]]] = [("", body)]
    while stack:  # iterative: a body may nest as deep as json.loads allows
        path, value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(k, str):
                _lone_surrogate(path or "body", k, "has a key that contains")
            if isinstance(v, str):
                _lone_surrogate(_field(path, k), v)
            elif isinstance(v, dict | list):
                stack.append((_field(path, k), v))


def get_str(body: dict[str, Any], name: str, default: str | None = None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"must be a string, got {json.dumps(v)[:40]}")
    return v


def get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"must be true or false, got {json.dumps(v)[:40]}")
    return v


def get_float(body: dict[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(name, f"must be a finite number, got {json.dumps(v)[:40]}")
    return float(v)


def get_int(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON writers that only know doubles
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"must be an integer, got {json.dumps(v)[:40]}")
    if not -(2**63) <= v < 2**64:  # what the wire format (msgpack) carries
        raise bad(name, "is out of range (64 bits)")
    return v


def get_stop(body: dict[str, Any], name: str = "stop") -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(name, "must be a string or a list of strings")
    return [s for s in v if s]


def validated(params: SamplingParams, renames: dict[str, str]) -> SamplingParams:
    try:
        validate_sampling(params)
    except InvalidParameterError as e:
        name = renames.get(e.param, e.param)
        raise bad(name, str(e).split(": ", 1)[-1]) from None
    return params


def check_range(name: str, v: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if v is None:
        return
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")


# -- ollama ------------------------------------------------------------------------------------
def ollama_sampling(options: Any) -> tuple[SamplingParams, int | None]:
    """SamplingParams and num_ctx from an ollama ``options`` map (ollama's defaults otherwise)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad("options", "must be an object")
    for key in options:
        if key in _OLLAMA_IGNORED:
            log.info("ignoring ollama option %r (not used by tandem)", key)
        elif key not in _OLLAMA_KNOWN:
            log.warning("invalid option provided: %r (ignored)", key)
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9)
    if (v := get_float(options, "temperature")) is not None:
        p.temperature = v
    if (k := get_int(options, "top_k")) is not None:
        p.top_k = k
    if (v := get_float(options, "top_p")) is not None:
        p.top_p = v
    if (v := get_float(options, "min_p")) is not None:
        p.min_p = v
    if (v := get_float(options, "repeat_penalty")) is not None:
        p.repetition_penalty = v
    if (v := get_float(options, "presence_penalty")) is not None:
        p.presence_penalty = v
    if (v := get_float(options, "frequency_penalty")) is not None:
        p.frequency_penalty = v
    seed = get_int(options, "seed")
    p.seed = None if seed is None or seed < 0 else seed  # ollama: -1 = random
    n = get_int(options, "num_predict")
    if n is not None and n == 0:
        raise bad("num_predict", "must be >= 1, or -1 for no limit")
    p.max_tokens = None if n is None or n < 0 else n
    p.stop = get_stop(options)
    p.ignore_eos = get_bool(options, "ignore_eos", False)  # tandem extension (benchmarks, tests)
    num_ctx = get_int(options, "num_ctx")
    if num_ctx is not None and num_ctx < 2:
        raise bad("num_ctx", f"must be >= 2, got {num_ctx}")
    renames = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
    return validated(p, renames), num_ctx


_OLLAMA_KNOWN = frozenset(
    "temperature top_k top_p min_p repeat_penalty presence_penalty frequency_penalty seed "
    "num_predict stop num_ctx ignore_eos".split()
)


def ollama_logprobs(body: dict[str, Any]) -> int | None:
    """SamplingParams.logprobs from ollama's ``logprobs`` / ``top_logprobs``."""
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    return (top or 0) if want else None


# -- OpenAI ------------------------------------------------------------------------------------
MAX_N = 64  # choices per prompt: each is a request of its own in the scheduler


def openai_n(body: dict[str, Any]) -> int:
    """How many choices to generate per prompt (OpenAI's ``n``)."""
    n = get_int(body, "n")
    if n is None:
        return 1
    if not 1 <= n <= MAX_N:
        raise bad("n", f"must be between 1 and {MAX_N}, got {n}")
    return n


def openai_sampling(body: dict[str, Any], chat: bool) -> SamplingParams:
    for name in ("best_of",):
        v = get_int(body, name)
        if v is not None and v != 1:
            raise bad(name, "only 1 is supported")
    if body.get("logit_bias"):
        raise bad("logit_bias", "is not supported")
    p = SamplingParams()
    if (v := get_float(body, "temperature")) is not None:
        check_range("temperature", v, 0.0, 2.0)
        p.temperature = v
    if (v := get_float(body, "top_p")) is not None:
        check_range("top_p", v, 0.0, 1.0, lo_open=True)
        p.top_p = v
    for name in ("presence_penalty", "frequency_penalty"):
        if (v := get_float(body, name)) is not None:
            check_range(name, v, -2.0, 2.0)
            setattr(p, name, v)
    # vLLM's extra sampling parameters, for clients that pass them through extra_body.
    if (k := get_int(body, "top_k")) is not None:
        p.top_k = k
    if (v := get_float(body, "min_p")) is not None:
        p.min_p = v
    if (v := get_float(body, "repetition_penalty")) is not None:
        p.repetition_penalty = v
    p.ignore_eos = get_bool(body, "ignore_eos", False)
    p.seed = get_int(body, "seed")
    p.stop = get_stop(body)
    mct, mt = get_int(body, "max_completion_tokens"), get_int(body, "max_tokens")
    p.max_tokens = mct if mct is not None else mt
    echo = not chat and get_bool(body, "echo", False)
    if p.max_tokens is not None and p.max_tokens < (0 if echo else 1):
        # 0 with echo: the prompt (and its logprobs) alone, nothing generated
        raise bad("max_completion_tokens" if mct is not None else "max_tokens", "must be >= 1")
    if chat:
        top = get_int(body, "top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        if get_bool(body, "logprobs", False):
            p.logprobs = top or 0
        elif top:
            raise bad("top_logprobs", "needs logprobs set to true")
    else:
        lp = get_int(body, "logprobs")
        if lp is not None and not 0 <= lp <= MAX_TOP_LOGPROBS:
            raise bad("logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        p.logprobs = lp
        if echo:  # the prompt's own logprobs come back with it (computed even when not shown)
            p.prompt_logprobs = lp or 0
    return validated(p, {"logprobs": "top_logprobs" if chat else "logprobs"})


# A derived model's ollama PARAMETER -> (OpenAI request fields that override it, SamplingParams field).
_OPENAI_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "temperature": (("temperature",), "temperature"),
    "top_p": (("top_p",), "top_p"),
    "top_k": (("top_k",), "top_k"),
    "min_p": (("min_p",), "min_p"),
    "repeat_penalty": (("repetition_penalty",), "repetition_penalty"),
    "presence_penalty": (("presence_penalty",), "presence_penalty"),
    "frequency_penalty": (("frequency_penalty",), "frequency_penalty"),
    "seed": (("seed",), "seed"),
    "stop": (("stop",), "stop"),
    "num_predict": (("max_tokens", "max_completion_tokens"), "max_tokens"),
}


def openai_defaults(
    params: SamplingParams, body: dict[str, Any], parameters: dict[str, Any]
) -> SamplingParams:
    """A derived model's PARAMETERs on an OpenAI request, for the fields the request leaves unset."""
    for name, value in parameters.items():
        fields, attr = _OPENAI_OVERRIDES.get(name, ((), ""))
        if attr and all(body.get(f) is None for f in fields):
            if (name == "seed" and value < 0) or (name == "num_predict" and value <= 0):
                continue  # ollama's -1: random seed, no limit
            setattr(params, attr, list(value) if name == "stop" else value)
    return validated(params, {"repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"})


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object (the body-size limit is enforced by the app's middleware)."""
    return parse_body(await request.body())
