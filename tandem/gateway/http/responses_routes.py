"""OpenAI's Responses API, the text-only subset: POST /v1/responses.

`input` is a string or a list of messages (string content or `input_text` parts), `instructions`
becomes the system message, `max_output_tokens`, `temperature` and `top_p` map onto sampling. The
reply has one `message` output item with one `output_text` part; streams send `response.created`,
`response.output_text.delta` events and `response.completed`, with the item and part events in
between that OpenAI's SDK expects.

`previous_response_id` continues a conversation from responses this server still holds in memory
(the last `KEPT_RESPONSES` with `store` true; none survive a restart); any other id gets a 400.
Tools, files and images are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.http.errors import openai_error_body
from tandem.gateway.http.formats import JSONResponse, json_text
from tandem.gateway.http.inputs import chat_messages
from tandem.gateway.http.params import (
    bad,
    check_range,
    get_bool,
    get_float,
    get_int,
    get_str,
    read_json,
    validated,
)
from tandem.gateway.http.state import gateway_of
from tandem.gateway.http.streaming import CancellableStream, Generation, finish_reason, run_cancellable
from tandem.messages import FinishReason, SamplingParams, TokenDelta

router = APIRouter()
KEPT_RESPONSES = 1024
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_REFUSED = ("tools", "tool_choice", "reasoning", "include", "background", "conversation", "prompt")


class ResponseMemory:
    """The conversations behind recent responses, for `previous_response_id`; oldest dropped first."""

    def __init__(self, capacity: int = KEPT_RESPONSES) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def keep(self, response_id: str, messages: list[dict[str, Any]]) -> None:
        self._kept[response_id] = messages
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        try:
            return list(self._kept[response_id])
        except KeyError:
            raise bad(
                "previous_response_id",
                f"{response_id!r} is not a response this server holds (it keeps the last "
                f"{self.capacity} in memory, none across restarts)",
            ) from None


def _input_messages(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("input", "must be a string or a non-empty list of messages")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad(f"input[{i}]", "must be a message object with 'role' and 'content'")
        kind = item.get("type", "message")
        if kind != "message":
            raise bad(f"input[{i}].type", f"only 'message' items are supported, got {kind!r}")
        content = item.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype not in ("input_text", "output_text", "text"):
                    raise bad(f"input[{i}].content[{j}]", f"only text parts are supported, got {ptype!r}")
                parts.append({"type": "text", "text": part.get("text")})
            content = parts
        out.append({"role": item.get("role"), "content": content})
    return out


def _sampling(body: dict[str, Any]) -> SamplingParams:
    p = SamplingParams()
    if (v := get_float(body, "temperature")) is not None:
        check_range("temperature", v, 0.0, 2.0)  # the bounds /v1/chat/completions takes
        p.temperature = v
    if (v := get_float(body, "top_p")) is not None:
        check_range("top_p", v, 0.0, 1.0, lo_open=True)
        p.top_p = v
    if (n := get_int(body, "max_output_tokens")) is not None:
        if n < 1:
            raise bad("max_output_tokens", "must be >= 1")
        p.max_tokens = n
    p.seed = get_int(body, "seed")
    return validated(p, {"max_tokens": "max_output_tokens"})


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    arrival = time.monotonic()
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    for name in _REFUSED:
        if body.get(name):
            raise bad(name, "is not supported by tandem's /v1/responses (text input and output only)")
    text_cfg = body.get("text")
    if isinstance(text_cfg, dict) and (text_cfg.get("format") or {}).get("type", "text") != "text":
        raise bad("text.format", "only plain text output is supported")
    params = _sampling(body)
    instructions = get_str(body, "instructions")
    previous = get_str(body, "previous_response_id")
    memory: ResponseMemory = request.app.state.responses
    history = memory.conversation(previous) if previous else []
    turn = chat_messages(_input_messages(body.get("input")), openai=True)
    messages = [m for m in history if m["role"] != "system"] + turn
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    ids = await gw.encode_chat(messages)
    params.max_tokens = gw.fit_context(len(ids), params.max_tokens, None, clamp=False)
    gen = Generation(gw, ids, params, arrival)
    reply = _Reply(model, body, previous, instructions)
    await run_cancellable(request, gen.start())

    def remember(text: str) -> None:
        if get_bool(body, "store", True):
            memory.keep(reply.id, [*messages, {"role": "assistant", "content": text}])

    if get_bool(body, "stream", False):
        return CancellableStream(
            _events(gen, reply, remember),
            "text/event-stream",
            _SSE_HEADERS,
            error_frame=lambda msg: _event("error", {"code": "internal_error", "message": msg}),
            send_timeout=gw.settings.send_timeout,
        )

    async def collect() -> dict[str, Any]:
        text, _ = await gen.collect()
        remember(text)
        return reply.finished(gen, text)

    return JSONResponse(await run_cancellable(request, collect()))


class _Reply:
    """The response object's fixed fields and the ids of its one output item."""

    def __init__(
        self, model: str, body: dict[str, Any], previous: str | None, instructions: str | None
    ) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.body = body
        self.previous = previous
        self.instructions = instructions

    def response(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": self.instructions,
            "max_output_tokens": self.body.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": self.previous,
            "temperature": self.body.get("temperature", 1.0),
            "top_p": self.body.get("top_p", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "store": get_bool(self.body, "store", True),
            "metadata": self.body.get("metadata") or {},
            "usage": None,
        } | extra

    def item(self, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [_part(text)] if status == "completed" else [],
        }

    def finished(self, gen: Generation, text: str) -> dict[str, Any]:
        cut = finish_reason(gen.finished) == FinishReason.LENGTH
        f = gen.finished
        prompt = f.prompt_tokens if f else len(gen.prompt_ids)
        completion = f.completion_tokens if f else len(gen.token_ids)
        return self.response(
            "incomplete" if cut else "completed",
            [self.item(text, "completed")],
            incomplete_details={"reason": "max_output_tokens"} if cut else None,
            usage={
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": f.cached_tokens if f else 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
        )


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json_text({'type': kind} | data)}\n\n".encode()


async def _events(gen: Generation, reply: _Reply, remember: Any) -> AsyncIterator[bytes]:
    seq = iter(range(1 << 62))
    at = {"output_index": 0, "item_id": reply.item_id}
    part = {**at, "content_index": 0}

    def ev(kind: str, **data: Any) -> bytes:
        return _event(kind, {"sequence_number": next(seq)} | data)

    yield ev("response.created", response=reply.response("in_progress", []))
    yield ev("response.in_progress", response=reply.response("in_progress", []))
    yield ev("response.output_item.added", output_index=0, item=reply.item("", "in_progress"))
    yield ev("response.content_part.added", **part, part=_part(""))
    text = []
    try:
        async for e in gen.events():
            if isinstance(e, TokenDelta) and e.text:
                text.append(e.text)
                yield ev("response.output_text.delta", **part, delta=e.text, logprobs=[])
    except EngineError as e:
        err = await gen.gw.api_error(e)
        yield ev("error", **openai_error_body(err)["error"])
        return
    whole = "".join(text)
    remember(whole)
    yield ev("response.output_text.done", **part, text=whole, logprobs=[])
    yield ev("response.content_part.done", **part, part=_part(whole))
    yield ev("response.output_item.done", output_index=0, item=reply.item(whole, "completed"))
    yield ev("response.completed", response=reply.finished(gen, whole))
