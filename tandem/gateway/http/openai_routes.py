"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}].

Streams are server-sent events ending in ``data: [DONE]``; a stream that fails after it started
ends with one ``data: {"error": {...}}`` event instead (openai-python raises APIError on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.http.errors import ApiError, openai_error_body
from tandem.gateway.http.formats import JSONResponse, delta_logprobs, sse
from tandem.gateway.http.inputs import chat_messages, refuse_openai_features, with_defaults
from tandem.gateway.http.openai_shapes import Shape, chat_shape, completion_shape
from tandem.gateway.http.params import bad, get_bool, openai_defaults, openai_sampling, read_json
from tandem.gateway.http.state import Gateway, gateway_of
from tandem.gateway.http.streaming import CancellableStream, Generation, run_cancellable
from tandem.gateway.http.structured import openai_format
from tandem.gateway.http.tool_shapes import http_tools
from tandem.messages import TokenDelta
from tandem.tools.request import prompt_messages

log = logging.getLogger(__name__)
router = APIRouter()
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _stream_options(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad("stream_options", "must be an object")
    return get_bool(so, "include_usage", False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    refuse_openai_features(body, chat=True)
    params = openai_sampling(body, chat=True)
    await gw.constrain(params, openai_format(body), "response_format")
    messages = chat_messages(body.get("messages"), openai=True)
    if not messages:
        raise bad("messages", "must hold at least one message")
    d = gw.defaults_of(model)
    if d is not None:
        params = openai_defaults(params, body, d.parameters)
    template = (d.template if d else None) or gw.engine.tokenizer.chat_template
    tools = http_tools(body, template)
    if tools is not None and (forced := tools.grammar()) is not None:
        if params.grammar_kind:
            raise bad("response_format", "cannot be combined with a forced tool call (tool_choice)")
        await gw.constrain(params, forced, "tool_choice")
    prompt_msgs, template_kwargs = prompt_messages(with_defaults(messages, d), tools, template)
    ids = await gw.encode_chat(prompt_msgs, d.template if d else None, **template_kwargs)
    params.max_tokens = gw.fit_context(len(ids), params.max_tokens, None, clamp=False)
    shape = chat_shape(model, f"chatcmpl-{uuid.uuid4().hex}", gw.engine.tokenizer, tools)
    return await _respond(request, gw, Generation(gw, ids, params, arrival), body, shape)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    refuse_openai_features(body, chat=False)
    params = openai_sampling(body, chat=False)
    if (d := gw.defaults_of(model)) is not None:
        params = openai_defaults(params, body, d.parameters)
    await gw.constrain(params, openai_format(body), "response_format")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = await gw.encode_prompt(prompt, raw=True, system=None)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        ids = gw.check_token_ids(prompt, "prompt")
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", "only one prompt per request is supported")
    else:
        raise bad("prompt", "must be a string, or a list of token ids")
    params.max_tokens = gw.fit_context(len(ids), params.max_tokens if params.max_tokens else 16, None, False)
    shape = completion_shape(model, f"cmpl-{uuid.uuid4().hex}", gw.engine.tokenizer)
    return await _respond(request, gw, Generation(gw, ids, params, arrival), body, shape)


async def _respond(
    request: Request, gw: Gateway, gen: Generation, body: dict[str, Any], shape: Shape
) -> Response:
    stream = get_bool(body, "stream", False)
    include_usage = _stream_options(body) if stream else False
    await run_cancellable(request, gen.start())
    if stream:
        events = _events(gen, shape, include_usage)
        return CancellableStream(
            events,
            "text/event-stream",
            _SSE_HEADERS,
            error_frame=_sse_error,
            send_timeout=gw.settings.send_timeout,
        )

    async def collect() -> dict[str, Any]:
        text, lps = await gen.collect()
        return shape.whole(gen, text, lps)

    return JSONResponse(await run_cancellable(request, collect()))


async def _events(gen: Generation, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    tok = gen.gw.engine.tokenizer
    want_lps = gen.params.logprobs is not None
    first = shape.first_chunk(include_usage)
    if first is not None:
        yield sse(first)
    try:
        async for ev in gen.events():
            if isinstance(ev, TokenDelta):
                text = shape.stream_text(ev.text)
                if text or want_lps:
                    lps = delta_logprobs(tok, ev) if want_lps else None
                    yield sse(shape.chunk(text, lps, include_usage))
            else:
                for c in shape.tail_chunks(include_usage):
                    yield sse(c)
                yield sse(shape.finish_chunk(gen, include_usage))
                if include_usage:
                    yield sse(shape.usage_chunk(gen))
    except EngineError as e:
        err: ApiError = await gen.gw.api_error(e)
        yield sse(openai_error_body(err))
        return
    yield sse("[DONE]")


def _sse_error(message: str) -> bytes:
    return sse(openai_error_body(ApiError(500, message, code="internal_error")))


def _model_obj(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "tandem"}


def _pulled() -> list[tuple[str, float]]:
    from tandem.errors import ModelStoreError
    from tandem.store.model_store import list_models

    with contextlib.suppress(ModelStoreError, OSError):
        return [(ref.name, ref.modified.timestamp()) for ref in list_models()]
    return []


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """Every model this server can run: its own (and aliases) first, then every pulled one."""
    gw = gateway_of(request)
    own = [gw.model_name, *(a for a in gw.settings.aliases if a != gw.model_name)]
    data = [_model_obj(n, gw.engine.started_at) for n in own]
    for name, modified in await asyncio.to_thread(_pulled):
        if not gw.serves(name):
            data.append(_model_obj(name, modified))
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> Response:
    gw = gateway_of(request)
    if gw.serves(model_id):
        return JSONResponse(_model_obj(model_id, gw.engine.started_at))
    for name, modified in await asyncio.to_thread(_pulled):
        if name == model_id or _same(name, model_id):
            return JSONResponse(_model_obj(model_id, modified))
    raise gw.not_found(model_id)


def _same(pulled: str, asked: str) -> bool:
    from tandem.errors import ModelStoreError
    from tandem.store.registry import canonical_name

    try:
        return canonical_name(asked) == pulled
    except ModelStoreError:
        return False
