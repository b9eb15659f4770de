"""ollama's generation API: POST /api/generate and POST /api/chat (NDJSON streams or one object)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.formats import JSONResponse, delta_logprobs, ndjson, ollama_logprobs, rfc3339
from tandem.gateway.http.inputs import chat_messages, refuse_ollama_features, with_defaults
from tandem.gateway.http.model_pool import parse_keep_alive
from tandem.gateway.http.params import bad, get_bool, get_str, ollama_sampling, read_json
from tandem.gateway.http.params import ollama_logprobs as logprobs_param
from tandem.gateway.http.state import Gateway, gateway_of
from tandem.gateway.http.streaming import CancellableStream, Generation, finish_reason, run_cancellable
from tandem.gateway.http.structured import ollama_format
from tandem.gateway.http.tool_shapes import http_tools, ollama_tool_calls
from tandem.messages import SamplingParams, TokenDelta
from tandem.tools.parse import ToolCall, ToolStream
from tandem.tools.request import prompt_messages

log = logging.getLogger(__name__)
router = APIRouter()

Chunk = Callable[..., dict[str, Any]]


async def _common(
    request: Request,
) -> tuple[float, Gateway, dict[str, Any], str, bool, SamplingParams, int | None]:
    """What /api/generate and /api/chat read alike: body, model, stream flag, options."""
    arrival = time.monotonic()
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    refuse_ollama_features(body, model)
    stream = get_bool(body, "stream", True)
    options = body.get("options")
    if (d := gw.defaults_of(model)) is not None and d.parameters:
        # A derived model's PARAMETERs are defaults: the request's own options win.
        options = d.parameters | (options if isinstance(options, dict) else {})
    params, num_ctx = ollama_sampling(options)
    params.logprobs = logprobs_param(body)
    await gw.constrain(params, ollama_format(body), "format")
    return arrival, gw, body, model, stream, params, num_ctx


async def _load_reply(gw: Gateway, model: str, keep_alive: Any, chat: bool) -> JSONResponse:
    """ollama's answer to an empty prompt: the model is loaded (open_model did that), or with
    keep_alive 0 unloaded at once (what `ollama stop` sends), or once its other requests end."""
    reason = "load"
    if keep_alive is not None and parse_keep_alive(keep_alive) == 0:
        reason = "unload"
        entry = gw.pool.entry_of(gw)
        if entry is not None:
            entry.unload_when_idle = True
            if entry.in_flight <= 1 and gw.engine.num_active == 0:  # this request's own lease
                await gw.pool.unload(entry)
    out: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    return JSONResponse(out | {"done": True, "done_reason": reason})


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    arrival, gw, body, model, stream, params, num_ctx = await _common(request)
    prompt = get_str(body, "prompt", "") or ""
    context = body.get("context") or []
    if not isinstance(context, list):
        raise bad("context", "must be a list of token ids")
    context = gw.check_token_ids(context, "context")
    if not prompt and not context:
        return await _load_reply(gw, model, body.get("keep_alive"), chat=False)
    raw = get_bool(body, "raw", False)
    d = gw.defaults_of(model)
    system = get_str(body, "system") or (d.system if d else None)
    ids = list(context) + await gw.encode_prompt(prompt, raw, system, d.template if d else None)
    params.max_tokens = gw.fit_context(len(ids), params.max_tokens, num_ctx, clamp=True)

    def chunk(text: str, lps: list[dict[str, Any]] | None) -> dict[str, Any]:
        out = {"model": model, "created_at": rfc3339(), "response": text, "done": False}
        if lps is not None:
            out["logprobs"] = lps
        return out

    def final(gen: Generation, text: str) -> dict[str, Any]:
        out = {
            "model": model,
            "created_at": rfc3339(),
            "response": text,
            "done": True,
            "done_reason": finish_reason(gen.finished),
            "context": ids + gen.token_ids,
        }
        return out | gen.durations_ns()

    return await _respond(request, gw, Generation(gw, ids, params, arrival), stream, chunk, final)


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    arrival, gw, body, model, stream, params, num_ctx = await _common(request)
    messages = chat_messages(body.get("messages"), openai=False)
    if not messages:
        return await _load_reply(gw, model, body.get("keep_alive"), chat=True)
    d = gw.defaults_of(model)
    messages = with_defaults(messages, d, get_str(body, "system"))
    template = (d.template if d else None) or gw.engine.tokenizer.chat_template
    tools = http_tools(body, template)
    if tools is not None and (forced := tools.grammar()) is not None:
        if params.grammar_kind:
            raise bad("format", "cannot be combined with a forced tool call (tool_choice)")
        await gw.constrain(params, forced, "tool_choice")
    prompt_msgs, template_kwargs = prompt_messages(messages, tools, template)
    ids = await gw.encode_chat(prompt_msgs, d.template if d else None, **template_kwargs)
    params.max_tokens = gw.fit_context(len(ids), params.max_tokens, num_ctx, clamp=True)

    def message(text: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = ollama_tool_calls(calls)
        return msg

    def chunk(
        text: str, lps: list[dict[str, Any]] | None, calls: list[ToolCall] | None = None
    ) -> dict[str, Any]:
        out = {"model": model, "created_at": rfc3339(), "message": message(text, calls), "done": False}
        if lps is not None:
            out["logprobs"] = lps
        return out

    def final(gen: Generation, text: str) -> dict[str, Any]:
        calls = None
        if tools is not None and text:  # a whole reply (a stream sent its calls in a chunk)
            text, calls = tools.parse(text)
        out = {
            "model": model,
            "created_at": rfc3339(),
            "message": message(text, calls),
            "done": True,
            "done_reason": finish_reason(gen.finished),
        }
        return out | gen.durations_ns()

    gen = Generation(gw, ids, params, arrival)
    return await _respond(request, gw, gen, stream, chunk, final, tools.stream() if tools else None)


async def _respond(
    request: Request,
    gw: Gateway,
    gen: Generation,
    stream: bool,
    chunk: Chunk,
    final: Callable[[Generation, str], dict[str, Any]],
    tool_stream: ToolStream | None = None,
) -> Response:
    await run_cancellable(request, gen.start())
    want_lps = gen.params.logprobs is not None
    if stream:
        lines = _lines(gen, chunk, final, want_lps, tool_stream)
        return CancellableStream(
            lines,
            "application/x-ndjson",
            error_frame=lambda m: ndjson({"error": m}),
            send_timeout=gw.settings.send_timeout,
        )

    async def collect() -> dict[str, Any]:
        text, lps = await gen.collect()
        out = final(gen, text)
        if lps is not None:
            out["logprobs"] = ollama_logprobs(lps)
        return out

    return JSONResponse(await run_cancellable(request, collect()))


async def _lines(
    gen: Generation,
    chunk: Chunk,
    final: Callable[[Generation, str], dict[str, Any]],
    want_lps: bool,
    tool_stream: ToolStream | None,
) -> AsyncIterator[bytes]:
    tok = gen.gw.engine.tokenizer
    try:
        async for ev in gen.events():
            if isinstance(ev, TokenDelta):
                text = ev.text if tool_stream is None else tool_stream.feed(ev.text)
                if text or want_lps:
                    lps = ollama_logprobs(delta_logprobs(tok, ev)) if want_lps else None
                    yield ndjson(chunk(text, lps))
            else:
                if tool_stream is not None:
                    rest, calls = tool_stream.finish()
                    if rest or calls:  # ollama sends calls in a chunk of their own before the last
                        yield ndjson(chunk(rest, None, calls))
                yield ndjson(final(gen, ""))
    except EngineError as e:
        err: ApiError = await gen.gw.api_error(e)
        yield ndjson({"error": err.message})
