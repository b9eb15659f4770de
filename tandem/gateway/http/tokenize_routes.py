"""vLLM's POST /tokenize and POST /detokenize, which evaluation harnesses (lm-eval's
`tokenizer_backend=auto`) probe for to tokenize with the server's own tokenizer.

/tokenize takes `prompt` (raw text: no chat template; `add_special_tokens`, default true, adds
the model's BOS where generation would) or `messages` (rendered through the chat template with the
generation prompt, as /v1/chat/completions does), and returns `tokens`, `count` and
`max_model_len`. /detokenize takes `tokens` and returns `prompt`. GET /tokenizer_info gives the
special tokens' text and the chat template: lm-eval needs it (with `eos_token`) before it picks
the server's tokenizer (`tokenizer_backend=remote`), which then encodes the EOS text to find its id.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.gateway.http.formats import JSONResponse
from tandem.gateway.http.inputs import chat_messages
from tandem.gateway.http.params import bad, get_bool, read_json
from tandem.gateway.http.state import gateway_of

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json(request)
    if body.get("model") is not None:
        gw, _ = await gw.open_model(request, body)
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise bad("prompt", "give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if has_messages:
        ids = await gw.encode_chat(chat_messages(body["messages"], openai=True))
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise bad("prompt", "must be a string")
        # As /v1/completions encodes a prompt, so that counts agree with what generation sees.
        bos = get_bool(body, "add_special_tokens", True)
        tok = gw.engine.tokenizer
        ids = await asyncio.to_thread(tok.encode, prompt, add_bos=None if bos else False, parse_special=True)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": gw.engine.context_length})


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> Response:
    gw = gateway_of(request)
    if request.query_params.get("model"):
        gw, _ = await gw.open_model(request, {"model": request.query_params["model"]})
    tok = gw.engine.tokenizer

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_piece(token_id)

    return JSONResponse(
        {
            "tokenizer_class": tok.model,
            "bos_token": text(tok.bos_id),
            "eos_token": text(tok.eos_id),
            "pad_token": text(tok.pad_id),
            "unk_token": text(tok.unk_id),
            "add_bos_token": tok.add_bos,
            "add_eos_token": tok.add_eos,
            "chat_template": tok.chat_template,
            "model_max_length": gw.engine.context_length,
            "vocab_size": tok.vocab_size,
        }
    )


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json(request)
    if body.get("model") is not None:
        gw, _ = await gw.open_model(request, body)
    tokens: Any = body.get("tokens")
    if not isinstance(tokens, list):
        raise bad("tokens", "must be a list of token ids")
    ids = gw.check_token_ids(tokens, "tokens")
    return JSONResponse({"prompt": gw.engine.tokenizer.decode(ids)})
