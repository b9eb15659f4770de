"""The ZeroMQ front end's clients: who is connected, sending to them, and noticing when they leave.

A ROUTER socket says nothing when a peer goes away; the only reliable signal is a send failing
(ROUTER_MANDATORY raises EHOSTUNREACH for a vanished peer). So clients with work in flight are sent
a KeepAlive when they have heard nothing for a while and whenever the socket reports a disconnect,
and a failed send marks the client gone and cancels everything it had in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from tandem.messages import Finished, KeepAlive, RequestError, encode

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0  # default: a client this far behind (its queue full for so long) counts as gone
PROBE_INTERVAL_S = 1.0  # how often silent clients with requests in flight are checked for


@dataclass
class ClientRequest:
    rid: str
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None  # "cancelled" (client), "gone" (client vanished), "shutdown"
    accepted: bool = False  # Accepted sent: from here on a client's Cancel interrupts the task
    prompt_tokens: int = 0
    completion_tokens: int = 0
    terminal: Finished | RequestError | None = None
    tools: Any = None  # the request's ToolRequest, when it has tools: its reply is parsed for calls
    text: str = ""  # the reply so far, kept only for tools

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.cancel_reason = self.cancel_reason or reason
            # So that a Finished always follows an Accepted, a client's Cancel waits for the Accepted.
            if self.accepted or reason != "cancelled":
                self.task.cancel()


@dataclass
class Client:
    identity: bytes
    envelope: bool = False  # mirror an empty delimiter frame the client sends
    gone: bool = False
    last_send: float = field(default_factory=time.monotonic)
    requests: dict[str, ClientRequest] = field(default_factory=dict)


class Peers:
    """The clients of one ROUTER socket that have requests in flight, and the sends to any client.

    ``spawn`` runs a coroutine as a task the front end tracks, so that closing it waits for (or
    cancels) the sends still under way.
    """

    def __init__(
        self,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        send_timeout: float = SEND_TIMEOUT_S,
    ) -> None:
        self.clients: dict[bytes, Client] = {}
        self._spawn = spawn
        self.send_timeout = send_timeout  # serve --send-timeout, the same budget HTTP streams get
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    def attach(self, sock: zmq.asyncio.Socket) -> None:
        """Send on ``sock``, the front end's ROUTER (the front end binds and closes it)."""
        self._sock = sock

    def watch(self) -> None:
        """Have the attached socket report disconnects, for `monitor_loop`."""
        assert self._sock is not None
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # type: ignore[assignment]

    def detach(self) -> None:
        """Stop watching and sending: from here on `send` returns False."""
        if self._sock is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock = None

    # -- sending -------------------------------------------------------------------------
    def reply(self, client: Client, msg: Any) -> None:
        self._spawn(self.send(client, msg))

    async def send(self, client: Client, msg: Any) -> bool:
        """False once the client is gone (then all its requests are being cancelled)."""
        if client.gone or self._sock is None:
            return False
        frames = [client.identity, b"", encode(msg)] if client.envelope else [client.identity, encode(msg)]
        delay, deadline = 0.001, time.monotonic() + self.send_timeout
        while True:
            try:
                # NOBLOCK: a full client queue must not stall the other clients' sends
                await self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
                client.last_send = time.monotonic()
                return True
            except zmq.Again:
                if time.monotonic() > deadline:
                    # a warning, as HTTP's: the client is there but its requests are cut off
                    log.warning(
                        "client %s stopped reading for %g s: %d request(s) cancelled",
                        client.identity.hex(),
                        self.send_timeout,
                        len(client.requests),
                    )
                    self._gone(client, "stopped reading")
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    log.warning("send to client failed: %s", e)
                self._gone(client, "disconnected")
                return False

    def _gone(self, client: Client, why: str) -> None:
        if client.gone:
            return
        client.gone = True
        if client.requests:
            log.info(
                "client %s %s: cancelling %d request(s)", client.identity.hex(), why, len(client.requests)
            )
        me = asyncio.current_task()
        for req in list(client.requests.values()):
            if req.task is me:  # the caller's own task: it sees False from send and returns
                req.cancel_reason = "gone"
            else:
                req.cancel("gone")

    # -- noticing departures -------------------------------------------------------------
    def _probe(self) -> None:
        now = time.monotonic()
        for client in list(self.clients.values()):
            if now - client.last_send >= PROBE_INTERVAL_S / 2:
                self.reply(client, KeepAlive(time.time()))

    async def probe_loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            self._probe()

    async def monitor_loop(self) -> None:
        # A disconnect event does not say which identity left: probe every client with work.
        assert self._monitor is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                await asyncio.sleep(0.01)  # let the ROUTER drop the pipe first
                for client in list(self.clients.values()):
                    self.reply(client, KeepAlive(time.time()))
