"""HTTP errors in the two shapes clients parse: ollama's ``{"error": "..."}`` and OpenAI's
``{"error": {"message", "type", "param", "code"}}``; which one depends on the route (``/v1/`` is
OpenAI's). Engine errors map to statuses here, in one table, so every route agrees.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.http.formats import JSONResponse, json_text
from tandem.messages import ErrorCode

log = logging.getLogger(__name__)


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)


class BodyTooLarge(Exception):
    """Raised from the request body reader once the limit is passed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes")
        self.limit = limit


# Every ErrorCode -> (HTTP status, OpenAI error code): the one place codes become statuses.
_ENGINE_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request"),
    ErrorCode.CONTEXT_LENGTH: (400, "context_length_exceeded"),
    ErrorCode.BUSY: (503, "server_busy"),
    ErrorCode.WORKER_DIED: (503, "worker_died"),
    ErrorCode.SHUTTING_DOWN: (503, "shutting_down"),
    ErrorCode.CANCELLED: (499, "cancelled"),
    ErrorCode.TIMEOUT: (504, "timeout"),
    ErrorCode.INTERNAL: (500, "internal_error"),
}


def from_engine_error(e: EngineError) -> ApiError:
    status, code = _ENGINE_STATUS.get(e.code, _ENGINE_STATUS[ErrorCode.INTERNAL])
    message = str(e)
    if e.code == ErrorCode.BUSY and "server busy" not in message:
        message = f"server busy: {message}"
    if status == 500:
        log.error("engine error %s: %s", e.code, message)
    # Whole seconds (RFC 9110), rounded up, never 0: a client that retries at once would only
    # be refused again.
    headers = {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))} if e.code == ErrorCode.BUSY else {}
    return ApiError(status, message, code=code, headers=headers)


def openai_type(status: int) -> str:
    if status == 403:
        return "permission_error"
    if status == 404 or 400 <= status < 500:
        return "invalid_request_error"
    return "server_error"


def openai_error_body(err: ApiError) -> dict:
    return {
        "error": {
            "message": err.message,
            "type": openai_type(err.status),
            "param": err.param,
            "code": err.code or (str(err.status) if err.status >= 500 else None),
        }
    }


def ollama_error_body(err: ApiError) -> dict:
    return {"error": err.message}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(err: ApiError, path: str) -> Response:
    body = openai_error_body(err) if is_openai_path(path) else ollama_error_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers or None)


def error_bytes(err: ApiError, path: str) -> bytes:
    body = openai_error_body(err) if is_openai_path(path) else ollama_error_body(err)
    return json_text(body).encode()
