"""GET /api/trace: the scheduler's per-step timings when `serve --trace-steps N` recorded them
(a tandem extension; `tandem bench --trace` turns them into a Chrome / Perfetto trace)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.engine.router import EngineError
from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.formats import JSONResponse
from tandem.gateway.http.params import bad
from tandem.gateway.http.state import gateway_of
from tandem.messages import STEP_TRACE_FIELDS

router = APIRouter()


def _since(request: Request) -> int:
    raw = request.query_params.get("since", "0")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise bad("since", f"must be a step number >= 0, got {raw[:40]!r}")
    return int(raw)


@router.get("/api/trace")
async def trace(request: Request) -> Response:
    gw = gateway_of(request)
    since = _since(request)
    try:
        t = await gw.engine.trace(since)
    except EngineError as e:
        raise await gw.api_error(e) from None
    except TimeoutError:
        raise ApiError(503, "the scheduler did not answer within 5 s") from None
    if not t.enabled:
        raise ApiError(404, "step tracing is off: start the server with --trace-steps N")
    return JSONResponse(
        {
            "capacity": t.capacity,
            "scheduler_pid": t.scheduler_pid,
            "worker_pid": t.worker_pid,
            "fields": list(STEP_TRACE_FIELDS),
            "steps": t.steps,
        }
    )
