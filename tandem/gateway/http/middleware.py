"""The guard in front of every route: Host check (DNS rebinding), Origin check and CORS (cross-site
requests from web pages), body-size limit, request counts.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers and breaks streaming
disconnect detection.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.gateway.http.errors import BodyTooLarge, is_openai_path, openai_type
from tandem.gateway.http.formats import json_text
from tandem.gateway.http.metrics import Metrics

log = logging.getLogger(__name__)

_WILDCARD = {"0.0.0.0", "::"}
_DNS_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # also an IPv4 address
_PORT = re.compile(r"[0-9]{1,5}")


# -- Host ----------------------------------------------------------------------------------------
def _valid_port(rest: str) -> bool:
    """``rest`` is what follows the name: nothing, or ':' and a port of 1-65535."""
    if not rest:
        return True
    return rest[0] == ":" and _PORT.fullmatch(rest[1:]) is not None and 1 <= int(rest[1:]) <= 65535


def _ipv6(text: str) -> str | None:
    if "%" in text:  # a zone id names a local interface; no browser sends one
        return None
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def host_name(header: str) -> str | None:
    """The name in a Host header, lowercase ('Example.COM:8080' -> 'example.com', '[::1]:80' -> '::1'),
    or None when the header is not exactly a name and an optional port. Nothing is trimmed or
    guessed: a lenient parse is what lets a crafted header pass for an allowed one."""
    h = header.lower()
    if h.startswith("["):  # IPv6 only in brackets, as in URLs
        end = h.find("]")
        name = _ipv6(h[1:end]) if end > 0 else None
        rest = h[end + 1 :]
    else:
        name = h.partition(":")[0]
        rest = h[len(name) :]
        name = name[:-1] if name.endswith(".") else name  # the absolute form 'localhost.'
        name = name if _DNS_NAME.fullmatch(name) else None
    return name if name is not None and _valid_port(rest) else None


def configured_host(value: str) -> str:
    """An --allowed-host or bind address as host_name spells it; ValueError when it is none."""
    name = _ipv6(value) if ":" in value and not value.startswith("[") else host_name(value)
    if name is None:
        raise ValueError(f"{value!r} is not a host name, an IP address or [IPv6], with an optional :port")
    return name


def allowed_names(bind_host: str, extra: tuple[str, ...]) -> frozenset[str]:
    names = {configured_host(n) for n in extra if n}
    try:
        bound = configured_host(bind_host)
    except ValueError:  # an address no Host header can name (a zone id): only loopback names then
        bound = ""
    if bound and bound not in _WILDCARD:
        names.add(bound)
    return frozenset(names)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Loopback names and addresses, the bound address and configured names; as ollama, which
    refuses other names so a web page cannot reach the server through a rebound DNS name."""
    if header is None:
        return True  # no browser omits Host; rebinding needs a browser
    name = host_name(header)
    if name is None:
        return False
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- Origin --------------------------------------------------------------------------------------
# As ollama: pages served from this machine (any port), and the schemes of desktop apps and editors.
DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
)
_ORIGIN_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/]*")
_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
_ALLOW_HEADERS = (
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, X-Stainless-Lang, "
    "X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, X-Stainless-Runtime, "
    "X-Stainless-Runtime-Version, X-Stainless-Async, X-Stainless-Retry-Count, X-Stainless-Timeout, "
    "X-Stainless-Helper-Method, X-Stainless-Poll-Helper, X-Stainless-Custom-Poll-Helper"
)
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+( *, *[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def _compile_origin(pattern: str) -> re.Pattern[str]:
    p = pattern.strip().lower().rstrip("/")
    if not _ORIGIN_PATTERN.fullmatch(p):
        raise ValueError(
            f"origin {pattern!r} is not '*' or scheme://host[:port] (a '*' may stand for part of it, "
            "as in https://*.example.com)"
        )
    return re.compile("[a-z0-9._-]*".join(re.escape(part) for part in p.split("*")))


class OriginPolicy:
    """Which web pages may call the server: the defaults plus ``extra`` patterns ('*' allows all).
    A browser sends Origin with every cross-site request it lets a page make; clients that are
    not browsers send none, and are not affected."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        patterns = [*DEFAULT_ORIGINS, *(p for p in extra if p.strip())]
        self.allow_all = any(p.strip() == "*" for p in patterns)
        self._patterns = [_compile_origin(p) for p in patterns if p.strip() != "*"]

    def allows(self, origin: str) -> bool:
        o = origin.lower()
        return self.allow_all or any(p.fullmatch(o) for p in self._patterns)


def _route_label(path: str, known: frozenset[str]) -> str:
    if path in known:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        allowed: frozenset[str],
        origins: OriginPolicy,
        max_body: int,
        metrics: Metrics,
        known: frozenset[str],
    ) -> None:
        self.app = app
        self.allowed = allowed
        self.origins = origins
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
        origin = headers.get("origin")
        cors = self._cors_headers(origin)

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            refusal = self._refusal(headers) or _draining(scope)
            if refusal is not None:
                await self._reply(counting_send, path, *refusal)
                return
            if cors and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await self._preflight(counting_send, headers.get("access-control-request-headers"))
                return
            await self.app(scope, self._limited(receive), counting_send)
        finally:
            status = str(status_seen[0]) if status_seen else "499"
            self.metrics.requests.labels(_route_label(path, self.known), status).inc()

    def _cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        """What every response to an allowed cross-origin request carries, so the page may read it."""
        if origin is None or not self.origins.allows(origin):
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    def _refusal(self, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """(status, message, code) when the request is refused before any route sees it."""
        host = headers.get("host")
        if not host_allowed(host, self.allowed):
            log.warning("refused a request for Host %r (add it with --allowed-host)", host)
            return 403, f"host '{host}' is not allowed", "permission_error"
        origin = headers.get("origin")
        if origin is not None and not self.origins.allows(origin):
            log.warning("refused a request from Origin %r (add it with --origins)", origin)
            msg = f"origin '{origin}' is not allowed (allow it with --origins or TANDEM_ORIGINS)"
            return 403, msg, "permission_error"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            msg = f"request body of {length} bytes is larger than the limit of {self.max_body} bytes"
            return 413, msg, "request_too_large"
        return None

    @staticmethod
    async def _preflight(send: Send, requested: str | None) -> None:
        """A browser's CORS preflight from an allowed origin (send adds Access-Control-Allow-Origin)."""
        # Echo the headers the page asked to send (it is allowed), else the usual set.
        requested = (requested or "").strip()
        allow = requested if _HEADER_LIST.fullmatch(requested) else _ALLOW_HEADERS
        pairs = [
            ("access-control-allow-methods", _ALLOW_METHODS),
            ("access-control-allow-headers", allow),
            ("access-control-max-age", "43200"),
            ("vary", "Access-Control-Request-Method, Access-Control-Request-Headers"),
            ("content-length", "0"),
        ]
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

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
            body = {"error": {"message": message, "type": openai_type(status), "param": None, "code": code}}
        else:
            body = {"error": message}
        data = json_text(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _draining(scope: Scope) -> tuple[int, str, str] | None:
    """After SIGTERM the server still answers, while running requests drain: new ones get 503."""
    app = scope.get("app")
    gateway = getattr(getattr(app, "state", None), "gateway", None)
    if gateway is not None and gateway.draining:
        return 503, "server is shutting down", "shutting_down"
    return None
