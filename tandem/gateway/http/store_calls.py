"""The model store's blocking file work, run off the event loop on threads of its own.

asyncio's default pool also tokenizes long prompts, so store work that is slow or stuck (a hung
network mount, a model lock held by a `tandem pull` in another process) must not take its threads.
A lane has a few threads, and each call a time limit: past it the client gets an error naming the
operation and the limit, while the thread, which cannot be interrupted, finishes (or stays stuck)
on its own, holding nothing but its own slot. The threads are daemon threads, so one that never
returns cannot keep the server from exiting either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreTimeout(Exception):
    def __init__(self, what: str, limit: float) -> None:
        super().__init__(
            f"{what} did not finish within {limit:g} s: the model store's files are slow to reach or "
            "locked (a pull of the same model in progress?); try again later"
        )


class StoreLane:
    """At most `threads` store calls at a time; the rest wait for a slot, within their time limit."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self._slots = asyncio.Semaphore(threads)
        self._count = 0

    async def run(self, what: str, limit: float, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a lane thread; StoreTimeout if it has not returned `limit` s from now."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                await self._slots.acquire()
                done: asyncio.Future[T] = loop.create_future()
                self._start(loop, done, fn, args)
                return await done
        except TimeoutError:
            log.warning("%s: still running after %g s, the client was told so", what, limit)
            raise StoreTimeout(what, limit) from None

    def _start(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any], fn: Callable[..., Any],
               args: tuple[Any, ...]) -> None:  # fmt: skip
        self._count += 1
        name = f"{self.name}-{self._count}"
        try:
            threading.Thread(target=self._work, args=(loop, done, fn, args), name=name, daemon=True).start()
        except BaseException:
            self._slots.release()  # the slot is the thread's to free, and there is no thread
            raise

    def _work(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[Any], fn: Callable[..., Any],
              args: tuple[Any, ...]) -> None:  # fmt: skip
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting request, which re-raises it
            error = e
        _post(loop, self._slots.release)
        _post(loop, _settle, done, result, error)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
        loop.call_soon_threadsafe(fn, *args)


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():  # the request gave up (time limit, client gone)
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
