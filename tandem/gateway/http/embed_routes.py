"""Embeddings: ollama's POST /api/embed and /api/embeddings (legacy), OpenAI's POST /v1/embeddings.

Every input is one embedding request to the scheduler (it shares the queue and the steps with
generation, many inputs packed into a step) and comes back as the model's pooled vector. An input
runs whole in one step, so it holds at most `max_embed_tokens` tokens (the context, and
--max-num-batched-tokens): longer ones are cut to it (`truncate`, default true; the final [SEP]
of a BERT input is kept) or, with `truncate: false`, refused with a 400 giving both counts.
`dimensions` keeps the first N components and renormalizes them (Matryoshka-style).
/api/embed returns L2-normalized vectors, as ollama's does; the other two the model's own
(normalized where its pooling config says so, and always for generative models).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.embed_limit import cut_input, max_embed_tokens
from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.formats import JSONResponse
from tandem.gateway.http.params import bad, get_bool, read_json
from tandem.gateway.http.state import Gateway, gateway_of
from tandem.messages import Finished

router = APIRouter()

MAX_INPUTS = 2048  # inputs per request (OpenAI's limit)


def check_embeds(gw: Gateway, model: str) -> None:
    if "embedding" not in gw.capabilities:
        raise ApiError(400, f"model '{model}' does not support embeddings", param="model")


async def _tokenize(gw: Gateway, texts: list[str]) -> list[list[int]]:
    tok = gw.engine.tokenizer
    encode = lambda: [tok.encode(t, parse_special=False) for t in texts]  # noqa: E731
    if sum(map(len, texts)) > 4096:
        return await asyncio.to_thread(encode)
    return encode()


def _fit(gw: Gateway, inputs: list[list[int]], truncate: bool) -> list[list[int]]:
    limit = max_embed_tokens(gw.engine)
    out = []
    for i, ids in enumerate(inputs):
        if len(ids) > limit:
            if not truncate:
                raise ApiError(
                    400,
                    f"input {i} is {len(ids)} tokens, longer than the {limit} tokens the model embeds "
                    "(truncate is false)",
                    param="input",
                    code="context_length_exceeded",
                )
        out.append(cut_input(ids, limit, gw.engine.tokenizer))
    return out


async def embed_inputs(gw: Gateway, inputs: list[list[int]]) -> list[tuple[np.ndarray, Finished]]:
    """Every input's vector and Finished, submitted at once (the scheduler batches them); the first
    engine error fails the request and cancels the rest."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(gw.engine.embed(ids)) for ids in inputs]
    except* EngineError as group:
        raise await gw.api_error(group.exceptions[0]) from None  # type: ignore[arg-type]
    results = []
    for t in tasks:
        vec, fin = t.result()
        results.append((np.frombuffer(vec.vector, dtype="<f4"), fin))
    return results


def _shape(vec: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    if dimensions is not None:
        vec = vec[:dimensions]
        normalize = True
    if normalize:
        norm = float(np.linalg.norm(vec))
        vec = vec / norm if norm > 0 else vec
    return vec.astype("<f4", copy=False)


def _dimensions(body: dict[str, Any], gw: Gateway) -> int | None:
    d = body.get("dimensions")
    if d is None:
        return None
    dims = gw.embedding_dims
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or (dims and d > dims):
        raise bad("dimensions", f"must be an integer in 1..{dims or 'the model dimensions'}, got {d!r}")
    return d


def _text_list(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return value
    raise bad(param, "must be a string or a list of strings")


@router.post("/api/embed")
async def ollama_embed(request: Request) -> Response:
    t0 = time.monotonic()
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    check_embeds(gw, model)
    texts = _text_list(body.get("input", []), "input")
    if len(texts) > MAX_INPUTS:
        raise bad("input", f"at most {MAX_INPUTS} inputs, got {len(texts)}")
    dimensions = _dimensions(body, gw)
    inputs = _fit(gw, await _tokenize(gw, texts), get_bool(body, "truncate", True))
    results = await embed_inputs(gw, inputs) if inputs else []
    return JSONResponse(
        {
            "model": model,
            "embeddings": [_shape(v, dimensions, normalize=True).tolist() for v, _ in results],
            "total_duration": int((time.monotonic() - t0) * 1e9),
            "load_duration": 0,  # the model is loaded with the server
            "prompt_eval_count": sum(f.prompt_tokens for _, f in results),
        }
    )


@router.post("/api/embeddings")
async def ollama_embeddings(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    check_embeds(gw, model)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad("prompt", "must be a string")
    if not prompt:
        return JSONResponse({"embedding": []})  # as ollama answers an empty prompt
    inputs = _fit(gw, await _tokenize(gw, [prompt]), truncate=True)
    ((vec, _),) = await embed_inputs(gw, inputs)
    return JSONResponse({"embedding": _shape(vec, None, normalize=False).tolist()})


def _openai_inputs(value: Any, gw: Gateway) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists): a string, strings, ids, or lists of ids."""
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return value, None
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return None, [gw.check_token_ids(value, "input")]
        if all(isinstance(x, list) and x for x in value):
            return None, [gw.check_token_ids(x, "input") for x in value]
    raise bad("input", "must be a string, a list of strings, a list of token ids, or a list of such lists")


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json(request)
    gw, model = await gw.open_model(request, body)
    check_embeds(gw, model)
    texts, ids = _openai_inputs(body.get("input"), gw)
    count = len(texts if texts is not None else ids or [])
    if count > MAX_INPUTS:
        raise bad("input", f"at most {MAX_INPUTS} inputs, got {count}")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad("encoding_format", f"must be 'float' or 'base64', got {fmt!r}")
    dimensions = _dimensions(body, gw)
    inputs = ids if ids is not None else await _tokenize(gw, texts or [])
    # Cut, not refused, by default (as ollama's OpenAI layer does): a small encoder's limit (256
    # tokens for all-minilm) is far below the chunks RAG clients send; `truncate: false` refuses.
    results = await embed_inputs(gw, _fit(gw, inputs, get_bool(body, "truncate", True)))
    data = []
    for i, (vec, _) in enumerate(results):
        v = _shape(vec, dimensions, normalize=False)
        emb: Any = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(f.prompt_tokens for _, f in results)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
