"""The JSON objects of OpenAI's chat.completion(.chunk) and text_completion, one class per kind."""

from __future__ import annotations

import time
from typing import Any

from tandem import __version__
from tandem.gateway.http.formats import prompt_logprob_entries
from tandem.gateway.http.streaming import Generation, finish_reason
from tandem.gateway.http.tool_shapes import openai_tool_calls
from tandem.messages import TokenDelta
from tandem.tokenizer.tokenizer import Tokenizer
from tandem.tools.request import ToolRequest

FINGERPRINT = f"fp_tandem_{__version__}"


def usage(gen: Generation) -> dict[str, Any]:
    return usage_of([gen], 1)


def usage_of(gens: list[Generation], n: int) -> dict[str, Any]:
    """Usage of a request's choices, ``n`` per prompt in order: completion tokens summed over all,
    each prompt (and its cached part) counted once, as OpenAI and vLLM do for n > 1."""
    prompt = completion = cached = 0
    for k, gen in enumerate(gens):
        f = gen.finished
        completion += f.completion_tokens if f else len(gen.token_ids)
        if k % n == 0:
            prompt += f.prompt_tokens if f else len(gen.prompt_ids)
            cached += f.cached_tokens if f else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Shape:
    object_chunk = ""
    object_whole = ""

    def __init__(self, model: str, rid: str, tokenizer: Tokenizer) -> None:
        self.model = model
        self.id = rid
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.index = 0  # the choice this shape answers (n, prompt lists): prompt i, sample j is i * n + j

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> dict[str, Any]:
        out = self._head(self.object_chunk) | {"choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, gens: list[Generation], n: int = 1) -> dict[str, Any]:
        return self._head(self.object_chunk) | {"choices": [], "usage": usage_of(gens, n)}

    # per kind
    def stream_text(self, text: str) -> str:
        """What of a delta's text to send now (a tool call in the making is held back)."""
        return text

    def tail_chunks(self, include_usage: bool) -> list[dict[str, Any]]:
        """Chunks to send after the last delta, before the finish chunk."""
        return []

    def first_chunk(self, include_usage: bool) -> dict[str, Any] | None:
        return None

    def echo_chunks(self, gen: Generation, ev: object, include_usage: bool) -> list[dict[str, Any]]:
        """Chunks of the echoed prompt to send before event ``ev`` (completions with echo)."""
        return []

    def chunk(self, text: str, lps: list[dict[str, Any]] | None, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def finish_chunk(self, gen: Generation, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, gen: Generation, text: str, lps: list[dict[str, Any]] | None) -> dict[str, Any]:
        raise NotImplementedError


class ChatShape(Shape):
    object_chunk = "chat.completion.chunk"
    object_whole = "chat.completion"

    def __init__(self, model: str, rid: str, tokenizer: Tokenizer, tools: ToolRequest | None = None) -> None:
        super().__init__(model, rid, tokenizer)
        self.tools = tools
        self._tool_stream = tools.stream() if tools is not None else None
        self._called = False

    def stream_text(self, text: str) -> str:
        return text if self._tool_stream is None else self._tool_stream.feed(text)

    def tail_chunks(self, include_usage: bool) -> list[dict[str, Any]]:
        if self._tool_stream is None:
            return []
        rest, calls = self._tool_stream.finish()
        out = []
        if rest:
            out.append(self.chunk(rest, None, include_usage))
        if calls:
            self._called = True
            delta = {"tool_calls": openai_tool_calls(calls, streamed=True)}
            out.append(
                self._chunk(
                    {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None},
                    include_usage,
                )
            )
        return out

    def _finish_reason(self, gen: Generation) -> str | None:
        return "tool_calls" if self._called else finish_reason(gen.finished)

    @staticmethod
    def _lps(lps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        return None if lps is None else {"content": lps, "refusal": None}

    def first_chunk(self, include_usage: bool) -> dict[str, Any]:
        choice = {
            "index": self.index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._chunk(choice, include_usage)

    def chunk(self, text: str, lps: list[dict[str, Any]] | None, include_usage: bool) -> dict[str, Any]:
        choice = {
            "index": self.index,
            "delta": {"content": text},
            "logprobs": self._lps(lps),
            "finish_reason": None,
        }
        return self._chunk(choice, include_usage)

    def finish_chunk(self, gen: Generation, include_usage: bool) -> dict[str, Any]:
        choice = {
            "index": self.index,
            "delta": {},
            "logprobs": None,
            "finish_reason": self._finish_reason(gen),
        }
        return self._chunk(choice, include_usage)

    def whole(self, gen: Generation, text: str, lps: list[dict[str, Any]] | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.tools is not None:
            content, calls = self.tools.parse(text)
            if calls:
                self._called = True
                message |= {"content": content or None, "tool_calls": openai_tool_calls(calls)}
        choice = {
            "index": self.index,
            "message": message,
            "logprobs": self._lps(lps),
            "finish_reason": self._finish_reason(gen),
        }
        return self._head(self.object_whole) | {"choices": [choice], "usage": usage(gen)}


class CompletionShape(Shape):
    object_chunk = "text_completion"
    object_whole = "text_completion"

    def __init__(self, model: str, rid: str, tokenizer: Tokenizer, echo: str | None = None) -> None:
        super().__init__(model, rid, tokenizer)
        self._offset = 0  # text_offset runs across the chunks of a stream
        self.echo = echo  # the prompt's text when it is echoed
        self._echo_sent = False
        self._prompt_seen = 0  # prompt positions whose logprobs are sent

    def echo_chunks(self, gen: Generation, ev: object, include_usage: bool) -> list[dict[str, Any]]:
        """The prompt's text with the first event, and its tokens' logprobs as they arrive."""
        if self.echo is None:
            return []
        prompt = isinstance(ev, TokenDelta) and ev.prompt_logprobs is not None
        if self._echo_sent and not prompt:
            return []
        lps = None
        if gen.params.logprobs is not None:
            d = ev if prompt and isinstance(ev, TokenDelta) else TokenDelta("", [], "")
            lps = prompt_logprob_entries(
                self.tokenizer, gen.prompt_ids, self._prompt_seen, d, head=not self._echo_sent
            )
            self._prompt_seen += len(d.prompt_logprobs or [])
        elif self._echo_sent:
            return []  # the text went out already and no logprobs are shown
        text = "" if self._echo_sent else self.echo
        self._echo_sent = True
        return [self.chunk(text, lps, include_usage)]

    def _legacy(self, lps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """The legacy completions logprobs: parallel lists, top_logprobs as {token: logprob}."""
        if lps is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in lps:
            out["tokens"].append(e["token"])
            out["token_logprobs"].append(e["logprob"])
            if e["logprob"] is None:  # the echoed prompt's first token
                out["top_logprobs"].append(None)
            else:
                tops: dict[str, float] = {}
                for t in e["top_logprobs"] or [e]:  # best first: tokens alike as text keep the best
                    tops.setdefault(t["token"], t["logprob"])
                out["top_logprobs"].append(tops)
            out["text_offset"].append(self._offset)
            self._offset += len(e["token"])
        return out

    def chunk(self, text: str, lps: list[dict[str, Any]] | None, include_usage: bool) -> dict[str, Any]:
        choice = {"index": self.index, "text": text, "logprobs": self._legacy(lps), "finish_reason": None}
        return self._chunk(choice, include_usage)

    def finish_chunk(self, gen: Generation, include_usage: bool) -> dict[str, Any]:
        choice = {
            "index": self.index,
            "text": "",
            "logprobs": None,
            "finish_reason": finish_reason(gen.finished),
        }
        return self._chunk(choice, include_usage)

    def whole(self, gen: Generation, text: str, lps: list[dict[str, Any]] | None) -> dict[str, Any]:
        if self.echo is not None:
            text = self.echo + text
            if lps is not None:
                prompt = prompt_logprob_entries(self.tokenizer, gen.prompt_ids, 0, gen.merged, head=True)
                lps = prompt + lps
        choice = {
            "index": self.index,
            "text": text,
            "logprobs": self._legacy(lps),
            "finish_reason": finish_reason(gen.finished),
        }
        return self._head(self.object_whole) | {"choices": [choice], "usage": usage(gen)}


def chat_shape(model: str, rid: str, tokenizer: Tokenizer, tools: ToolRequest | None = None) -> Shape:
    return ChatShape(model, rid, tokenizer, tools)


def completion_shape(model: str, rid: str, tokenizer: Tokenizer, echo: str | None = None) -> Shape:
    return CompletionShape(model, rid, tokenizer, echo)
