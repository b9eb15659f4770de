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

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.http.errors import ApiError, openai_error_body
from tandem.gateway.http.formats import JSONResponse, delta_logprobs, sse
from tandem.gateway.http.inputs import chat_messages, refuse_openai_features, with_defaults
from tandem.gateway.http.openai_shapes import Shape, chat_shape, completion_shape, usage_of
from tandem.gateway.http.params import bad, get_bool, openai_defaults, openai_n, openai_sampling, read_json
from tandem.gateway.http.state import Gateway, gateway_of
from tandem.gateway.http.streaming import CancellableStream, Generation, run_cancellable
from tandem.gateway.http.structured import openai_format
from tandem.gateway.http.tool_shapes import http_tools
from tandem.messages import SamplingParams, TokenDelta
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
    n = openai_n(body)
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
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    # each choice parses its own tool calls: a shape per choice
    shapes = [chat_shape(model, rid, gw.engine.tokenizer, tools) for _ in range(n)]
    return await _respond(request, _choices(gw, [ids], params, n, arrival, shapes), body, n)


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of token ids, or a list of either."""

    def is_ids(p: Any) -> bool:
        return isinstance(p, list) and bool(p) and all(type(t) is int for t in p)

    prompt = body.get("prompt")
    if isinstance(prompt, str) or is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        return list(prompt)
    raise bad("prompt", "must be a string, a list of token ids, or a non-empty list of either")


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    refuse_openai_features(body, chat=False)
    n = openai_n(body)
    params = openai_sampling(body, chat=False)
    if (d := gw.defaults_of(model)) is not None:
        params = openai_defaults(params, body, d.parameters)
    await gw.constrain(params, openai_format(body), "response_format")
    echo = get_bool(body, "echo", False)
    tok = gw.engine.tokenizer
    rid = f"cmpl-{uuid.uuid4().hex}"
    prompts: list[list[int]] = []
    shapes: list[Shape] = []
    max_tokens = 16 if params.max_tokens is None else params.max_tokens
    for i, prompt in enumerate(_prompts(body)):
        if isinstance(prompt, str):
            ids = await gw.encode_prompt(prompt, raw=True, system=None)
        else:
            ids = gw.check_token_ids(prompt, "prompt" if i == 0 else f"prompt[{i}]")
        prompts.append(ids)
        shown = (prompt if isinstance(prompt, str) else tok.decode(ids)) if echo else None
        shapes += [completion_shape(model, rid, tok, shown) for _ in range(n)]
    params.max_tokens = max_tokens
    return await _respond(request, _choices(gw, prompts, params, n, arrival, shapes), body, n)


def _choices(
    gw: Gateway,
    prompts: list[list[int]],
    params: SamplingParams,
    n: int,
    arrival: float,
    shapes: list[Shape],
) -> list[tuple[Generation, Shape]]:
    """One generation per choice, prompt i's sample j at index i * n + j; with a seed, sample j
    draws with seed + j so the choices differ. Every prompt must fit the context: a request is
    refused whole, before any choice is submitted."""
    out = []
    for k, shape in enumerate(shapes):
        ids, j = prompts[k // n], k % n
        p = msgspec.structs.replace(params, seed=None if params.seed is None else params.seed + j)
        p.max_tokens = gw.fit_context(len(ids), params.max_tokens, None, False)
        shape.index = k
        shape.created = shapes[0].created
        out.append((Generation(gw, ids, p, arrival), shape))
    return out


async def _start_all(gens: list[Generation]) -> None:
    """Submit every choice; if one is refused, the others are cancelled and its error raised."""
    try:
        results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    except BaseException:  # the client went away (run_cancellable): cancel the ones that started
        for g in gens:
            await g.aclose()
        raise
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for g in gens:
            await g.aclose()
        raise failed[0]


async def _respond(
    request: Request, choices: list[tuple[Generation, Shape]], body: dict[str, Any], n: int
) -> Response:
    gens = [g for g, _ in choices]
    gw = gens[0].gw
    stream = get_bool(body, "stream", False)
    include_usage = _stream_options(body) if stream else False
    await run_cancellable(request, _start_all(gens))
    if stream:
        return CancellableStream(
            _merged_events(choices, include_usage, n),
            "text/event-stream",
            _SSE_HEADERS,
            error_frame=_sse_error,
            send_timeout=gw.settings.send_timeout,
        )

    async def collect(gen: Generation, shape: Shape) -> dict[str, Any]:
        text, lps = await gen.collect()
        return shape.whole(gen, text, lps)

    async def collect_all() -> dict[str, Any]:
        try:
            wholes = await asyncio.gather(*(collect(g, s) for g, s in choices))
        finally:
            for g in gens:
                await g.aclose()
        out = wholes[0]
        out["choices"] = [c for w in wholes for c in w["choices"]]
        out["usage"] = usage_of(gens, n)
        return out

    return JSONResponse(await run_cancellable(request, collect_all()))


async def _merged_events(
    choices: list[tuple[Generation, Shape]], include_usage: bool, n: int
) -> AsyncIterator[bytes]:
    """Every choice's chunks as they come, interleaved; one error ends the stream (and, through
    the generators' closing, cancels every choice); usage once, after the last finish chunk."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    failed = False

    async def pump(gen: Generation, shape: Shape) -> None:
        nonlocal failed
        try:
            async for frame in _events(gen, shape, include_usage):
                queue.put_nowait(frame)
        except EngineError as e:
            failed = True
            err: ApiError = await gen.gw.api_error(e)
            queue.put_nowait(sse(openai_error_body(err)))
        except Exception as e:  # a bug: end the stream as CancellableStream would
            log.exception("stream failed")
            failed = True
            queue.put_nowait(_sse_error(f"internal error: {type(e).__name__}: {e}"))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump(g, s)) for g, s in choices]
    try:
        left = len(tasks)
        while left:
            frame = await queue.get()
            if frame is None:
                left -= 1
                if failed:
                    return
                continue
            yield frame
        if include_usage:
            yield sse(choices[0][1].usage_chunk([g for g, _ in choices], n))
        yield sse("[DONE]")
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for g, _ in choices:
            await g.aclose()


async def _events(gen: Generation, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    """One choice's chunks; an EngineError propagates."""
    tok = gen.gw.engine.tokenizer
    want_lps = gen.params.logprobs is not None
    first = shape.first_chunk(include_usage)
    if first is not None:
        yield sse(first)
    async for ev in gen.events():
        for c in shape.echo_chunks(gen, ev, include_usage):
            yield sse(c)
        if isinstance(ev, TokenDelta):
            text = shape.stream_text(ev.text)
            if text or (want_lps and ev.token_ids):  # an echo's prompt delta went out above
                lps = delta_logprobs(tok, ev) if want_lps else None
                yield sse(shape.chunk(text, lps, include_usage))
        else:
            for c in shape.tail_chunks(include_usage):
                yield sse(c)
            yield sse(shape.finish_chunk(gen, include_usage))


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
