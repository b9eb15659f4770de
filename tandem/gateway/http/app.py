"""The HTTP app of `tandem serve`: ollama's and OpenAI's APIs, /metrics and /health over one engine.

The app never blocks on the model: routes tokenize, validate and forward to the scheduler, and
every wait (queue, tokens) is an await. Errors keep each API's own shape on its own routes.
"""

from __future__ import annotations

import asyncio
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response

from tandem.engine.aio import AsyncEngine
from tandem.gateway.http import (
    embed_routes,
    ollama_models,
    ollama_routes,
    openai_routes,
    responses_routes,
    tokenize_routes,
    trace_routes,
)
from tandem.gateway.http.errors import ApiError, BodyTooLarge, error_response
from tandem.gateway.http.formats import JSONResponse
from tandem.gateway.http.middleware import GuardMiddleware, OriginPolicy, allowed_names
from tandem.gateway.http.model_pool import LeaseMiddleware
from tandem.gateway.http.openapi_doc import install_openapi
from tandem.gateway.http.state import Gateway, HttpSettings
from tandem.gateway.http.streaming import ClientGone

__all__ = ["HttpSettings", "build_app"]

log = logging.getLogger(__name__)

# ollama's clients and tools probe GET / for exactly this text.
ROOT_TEXT = "Ollama is running"


def build_app(engine: AsyncEngine, settings: HttpSettings) -> FastAPI:
    app = FastAPI(
        title="tandem", version=settings.version, docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    gw = Gateway(engine, settings)
    settings.extra.setdefault("pid", os.getpid())
    app.state.gateway = gw
    app.state.responses = responses_routes.ResponseMemory()
    routers = (
        ollama_routes.router,
        ollama_models.router,
        openai_routes.router,
        responses_routes.router,
        embed_routes.router,
        tokenize_routes.router,
        trace_routes.router,
    )
    for router in routers:
        app.include_router(router)
    _add_base_routes(app, gw)
    _add_error_handlers(app)
    install_openapi(app)
    # The routers' own lists: FastAPI's app.routes hides included routes behind one entry.
    known = frozenset(
        getattr(r, "path", "") for r in [*app.router.routes, *(x for rt in routers for x in rt.routes)]
    )
    app.add_middleware(
        GuardMiddleware,
        allowed=allowed_names(settings.bind_host, settings.allowed_hosts),
        origins=OriginPolicy(settings.origins),
        max_body=settings.max_body_bytes,
        metrics=gw.metrics,
        known=known,
    )
    app.add_middleware(LeaseMiddleware)
    return app


def _add_base_routes(app: FastAPI, gw: Gateway) -> None:
    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> Response:
        return PlainTextResponse(ROOT_TEXT, headers={"X-Tandem-Version": gw.settings.version})

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        stats = None if gw.engine.dead else await gw.stats(timeout=2.0)
        if gw.engine.dead is not None or stats is None or not stats.worker_alive:
            reason = gw.engine.dead or ("the scheduler did not answer" if stats is None else "worker is down")
            return JSONResponse({"status": "unavailable", "error": reason}, status_code=503)
        if stats.step_overdue_s > 0:
            # Stuck, not dead: the watchdog restarts the worker if the step stays overdue.
            reason = f"a step is {stats.step_overdue_s:.1f} s past its expected duration"
            return JSONResponse({"status": "degraded", "error": reason}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "model": gw.model_name,
                "running": stats.running,
                "waiting": stats.waiting,
                "worker_restarts": stats.worker_restarts,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        models = [m.gw for m in gw.pool.entries()]
        stats = await asyncio.gather(*(_none() if g.engine.dead else g.stats(timeout=2.0) for g in models))
        alive = {g.model_name: (st, g.engine.dead is None) for g, st in zip(models, stats, strict=True)}
        gw.metrics.set_stats(alive)
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _none() -> None:
    return None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> Response:
        return error_response(ApiError(413, str(exc), code="request_too_large"), request.url.path)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; it is what the request counter records

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = {404: f"{request.url.path} not found", 405: f"method {request.method} not allowed"}
        err = ApiError(exc.status_code, msg.get(exc.status_code, str(exc.detail)))
        resp = error_response(err, request.url.path)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(ApiError(400, f"invalid request: {exc.errors()}"), request.url.path)
