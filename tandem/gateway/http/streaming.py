"""One generation as the routes see it, and responses that notice a client going away.

A request's status is decided by its first engine event: admission errors (busy, context, bad
parameters) come back before any byte is sent, so they get a real HTTP status. After that the
stream's last line carries any error. Whenever the client disconnects, the engine iterator is
closed, which cancels the request in the scheduler (its slot and KV blocks are freed in a step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tandem.engine.router import EngineError
from tandem.gateway.http.formats import delta_logprobs
from tandem.gateway.http.state import Gateway
from tandem.messages import Finished, FinishReason, SamplingParams, TokenDelta, merge_delta

log = logging.getLogger(__name__)
T = TypeVar("T")
Event = TokenDelta | Finished


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_cancellable(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the client disconnects first; then cancel it and raise ClientGone."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves (shutdown): take the work down with us
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    return task.result()


class CancellableStream(Response):
    """A streaming response whose body iterator is cancelled as soon as the client disconnects,
    even while it waits for the next token (Starlette only notices at the next write), or when
    the client stops reading: once the connection's buffers are full (the kernel's, then the
    server's bounded write buffer), a write that waits longer than ``send_timeout`` cancels the
    request, which frees its batch slot and KV blocks as a disconnect does, and drops the
    connection."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        media_type: str,
        headers: dict[str, str] | None = None,
        error_frame: Callable[[str], bytes] | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self.chunks = chunks
        self.error_frame = error_frame  # the terminal frame to write if the body fails (a bug)
        self.send_timeout = send_timeout
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            while True:
                nxt = asyncio.ensure_future(anext(self.chunks))  # type: ignore[arg-type]
                await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    self.disconnected = True
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                        await nxt
                    log.info("client disconnected: request cancelled")
                    return
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                except Exception as e:
                    log.exception("stream failed")
                    if self.error_frame is None:
                        raise
                    chunk = self.error_frame(f"internal error: {type(e).__name__}: {e}")
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    return
                try:
                    await asyncio.wait_for(
                        send({"type": "http.response.body", "body": chunk, "more_body": True}),
                        self.send_timeout,
                    )
                except TimeoutError:
                    self.disconnected = True
                    log.warning("client stopped reading for %g s: request cancelled", self.send_timeout)
                    return  # the server drops a connection whose response never completed
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 servers raise on writes to a closed connection
            self.disconnected = True
        finally:
            watch.cancel()
            with contextlib.suppress(Exception):
                await self.chunks.aclose()  # type: ignore[attr-defined]


class Generation:
    """One request through the engine, timed and counted for /metrics and the final frame."""

    def __init__(self, gw: Gateway, prompt_ids: list[int], params: SamplingParams, arrival: float) -> None:
        gw.check_generates(gw.model_name)  # an encoder (BERT) only embeds
        self.gw = gw
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrival = arrival
        self.submitted = 0.0
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.finished: Finished | None = None
        self.error: EngineError | None = None
        self.token_ids: list[int] = []
        self.merged = TokenDelta("", [], "")  # collect(): every delta merged (echo reads its prompt part)
        # Every route checked the request (params, token ids, fit_context) to name its own fields.
        self._it = gw.engine.generate(prompt_ids, params, checked=True)
        self._first: Event | None = None
        self._outcome_recorded = False

    async def start(self) -> None:
        """Submit and wait for the first event; admission errors raise ApiError."""
        self.submitted = time.monotonic()
        try:
            self._first = await anext(self._it)  # type: ignore[arg-type]
        except EngineError as e:
            self._record("error")
            raise await self.gw.api_error(e) from None
        except BaseException:
            await self.aclose()
            raise

    async def events(self) -> AsyncIterator[Event]:
        """The first event, then the rest; an EngineError mid-way propagates (after being counted)."""
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield self._observe(first)
            async for ev in self._it:
                yield self._observe(ev)
        except EngineError as e:
            self.error = e
            self._record("error")
            raise
        finally:
            if self.finished is None and self.error is None:
                self._record("cancelled")
            await self.aclose()

    async def collect(self) -> tuple[str, list[dict[str, Any]] | None]:
        """A non-streaming reply's whole text and, when asked for, its per-token logprobs (in
        OpenAI's shape; ollama's routes map them); an engine error becomes the API's error."""
        whole = self.merged
        try:
            async for ev in self.events():
                if isinstance(ev, TokenDelta):
                    merge_delta(whole, ev)
        except EngineError as e:
            raise await self.gw.api_error(e) from None
        lps = delta_logprobs(self.gw.engine.tokenizer, whole) if self.params.logprobs is not None else None
        return whole.text, lps

    async def aclose(self) -> None:
        await self._it.aclose()  # type: ignore[attr-defined]

    def _observe(self, ev: Event) -> Event:
        now = time.monotonic()
        m = self.gw.metrics
        if isinstance(ev, TokenDelta):
            n = len(ev.token_ids)
            self.token_ids += ev.token_ids
            if n:
                if self.first_token_at is None:
                    self.first_token_at = now
                    m.ttft.labels(self.gw.model_name).observe(now - self.arrival)
                else:  # tokens that arrive together share the gap since the last ones
                    for _ in range(n):
                        m.itl.labels(self.gw.model_name).observe((now - self.last_token_at) / n)
                self.last_token_at = now
                m.rate.add(n, now)
        else:
            self.finished = ev
            self._record(ev.finish_reason)
        return ev

    def _record(self, outcome: str) -> None:
        if self._outcome_recorded:
            return
        self._outcome_recorded = True
        self.gw.metrics.outcomes.labels(outcome, self.gw.model_name).inc()
        self.gw.metrics.e2e.labels(self.gw.model_name).observe(time.monotonic() - self.arrival)

    def durations_ns(self) -> dict[str, Any]:
        """ollama's timing fields (integers, nanoseconds)."""
        f = self.finished
        now = time.monotonic()
        ns = 1_000_000_000
        return {
            "total_duration": int((now - self.arrival) * ns),
            # Nothing is loaded per request; this is the gateway's own time before submitting.
            "load_duration": int(max(0.0, self.submitted - self.arrival) * ns),
            "prompt_eval_count": f.prompt_tokens if f else len(self.prompt_ids),
            "prompt_eval_duration": int((f.prefill_s if f else 0.0) * ns),
            "eval_count": f.completion_tokens if f else len(self.token_ids),
            "eval_duration": int((f.decode_s if f else 0.0) * ns),
        }


def finish_reason(f: Finished | None) -> str:
    if f is None:
        return FinishReason.STOP
    if f.finish_reason in (FinishReason.LENGTH, FinishReason.CONTEXT):
        return FinishReason.LENGTH
    return f.finish_reason
