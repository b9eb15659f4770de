"""The guard in front of every route: Host check (DNS rebinding), body-size limit, request counts.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers and breaks streaming
disconnect detection.
"""

from __future__ import annotations

import ipaddress
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.gateway.http.errors import BodyTooLarge, is_openai_path
from tandem.gateway.http.metrics import Metrics

log = logging.getLogger(__name__)

_WILDCARD = {"0.0.0.0", "::", "[::]", ""}


def host_name(header: str) -> str:
    """'Example.COM:8080' -> 'example.com'; '[::1]:80' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def allowed_names(bind_host: str, extra: tuple[str, ...]) -> frozenset[str]:
    names = {host_name(n) for n in extra if n}
    if host_name(bind_host) not in _WILDCARD:
        names.add(host_name(bind_host))
    return frozenset(names)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Loopback names and addresses, the bound address and configured names; as ollama, which
    refuses other names so a web page cannot reach the server through a rebound DNS name."""
    if header is None:
        return True  # no browser omits Host; rebinding needs a browser
    name = host_name(header)
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _route_label(path: str, known: frozenset[str]) -> str:
    if path in known:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class GuardMiddleware:
    def __init__(
        self, app: ASGIApp, allowed: frozenset[str], max_body: int, metrics: Metrics, known: frozenset[str]
    ) -> None:
        self.app = app
        self.allowed = allowed
        self.max_body = max_body
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        status_seen: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            host = headers.get("host")
            if not host_allowed(host, self.allowed):
                log.warning("refused a request for Host %r (add it with --allowed-host)", host)
                await self._reply(
                    counting_send, path, 403, f"host '{host}' is not allowed", "permission_error"
                )
                return
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                msg = f"request body of {length} bytes is larger than the limit of {self.max_body} bytes"
                await self._reply(counting_send, path, 413, msg, "request_too_large")
                return
            await self.app(scope, self._limited(receive), counting_send)
        finally:
            status = str(status_seen[0]) if status_seen else "499"
            self.metrics.requests.labels(_route_label(path, self.known), status).inc()

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return limited

    @staticmethod
    async def _reply(send: Send, path: str, status: int, message: str, code: str) -> None:
        if is_openai_path(path):
            kind = "permission_error" if status == 403 else "invalid_request_error"
            body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        else:
            body = {"error": message}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
