"""ollama's model-management API: tags, show, ps, pull, delete, version.

The store does file IO (GGUF headers, manifests, downloads), so every store call runs on the
gateway's store lanes (store_calls.py), with a time limit: the loop keeps streaming tokens
meanwhile, and stuck file work never takes the threads that tokenization needs.

Over HTTP a pull names a catalogue model, a model ollama has pulled, or an hf:// file; a local
path only inside a folder the operator allowed (--allow-local-models), and names in show and
delete are store names, which cannot reach outside the store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.responses import Response

from tandem.errors import (
    DiskFullError,
    LocalPathError,
    ModelFileMissingError,
    ModelNotFoundError,
    ModelStoreError,
    PullError,
)
from tandem.formats.model_config import pooling_type_embeds
from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.formats import JSONResponse, ndjson, rfc3339
from tandem.gateway.http.model_pool import Loaded, plan_bytes
from tandem.gateway.http.params import get_bool, read_json
from tandem.gateway.http.state import Gateway, check_name, gateway_of, model_capabilities
from tandem.gateway.http.store_calls import StoreTimeout
from tandem.gateway.http.streaming import CancellableStream
from tandem.store import model_store as store
from tandem.store.describe import describe_model
from tandem.store.modelfile import ModelDefaults, check_messages, check_parameters, parse_modelfile
from tandem.store.registry import ModelRef

log = logging.getLogger(__name__)
router = APIRouter()
OLLAMA_API_VERSION = "0.12.6"
_NEVER = datetime(2318, 1, 1, tzinfo=UTC)  # expires_at of a model that stays loaded (as ollama's -1)


T = TypeVar("T")


def _store_error(e: ModelStoreError, name: str) -> ApiError:
    if isinstance(e, ModelNotFoundError) and not isinstance(e, ModelFileMissingError):
        return ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")
    if isinstance(e, LocalPathError):
        return ApiError(403, str(e), param="model", code="local_path_forbidden")
    if isinstance(e, DiskFullError):
        return ApiError(507, str(e), code="insufficient_storage")
    if isinstance(e, PullError):
        return ApiError(502, str(e))
    return ApiError(400, str(e))


async def _store_read(gw: Gateway, what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return await gw.store_reads.run(what, gw.settings.store_timeout, fn, *args)
    except StoreTimeout as e:
        raise ApiError(504, str(e), code="store_timeout") from None


async def _store_write(gw: Gateway, what: str, limit: float, fn: Callable[..., T], *args: Any) -> T:
    try:
        return await gw.store_writes.run(what, limit, fn, *args)
    except StoreTimeout as e:
        raise ApiError(504, str(e), code="store_timeout") from None


@functools.lru_cache(maxsize=64)
def _describe(path: str, size: int, modified: str) -> dict[str, Any]:
    # Keyed by file facts: a re-pulled model gets read again.
    return describe_model(store.inspect_path(Path(path)))


def _info(ref: ModelRef) -> dict[str, Any]:
    return _describe(str(ref.path), ref.size_bytes, ref.modified.isoformat())


def _details(info: dict[str, Any]) -> dict[str, Any]:
    arch = info.get("architecture") or "unknown"
    return {
        "parent_model": "",
        "format": info.get("format", "gguf"),
        "family": arch,
        "families": [arch],
        "parameter_size": info.get("parameter_size", ""),
        "quantization_level": str(info.get("file_type") or ""),
    }


def _model_info(info: dict[str, Any]) -> dict[str, Any]:
    arch = info.get("architecture") or "unknown"
    keys = {
        "context_length": "context_length",
        "embedding_length": "embedding_length",
        "feed_forward_length": "feed_forward_length",
        "block_count": "layers",
        "attention.head_count": "heads",
        "attention.head_count_kv": "kv_heads",
        "vocab_size": "vocab_size",
    }
    out: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": info.get("parameters")}
    if info.get("model_name"):
        out["general.name"] = info["model_name"]
    out |= {f"{arch}.{k}": info[v] for k, v in keys.items() if info.get(v) is not None}
    return out


def _entry(ref: ModelRef, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": ref.name,
        "model": ref.name,
        "modified_at": rfc3339(ref.modified),
        "size": ref.size_bytes,
        "digest": ref.sha256 or "",
        "details": _details(info),
    }


def _name(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")  # older clients send "name"
    if not name:
        raise ApiError(400, "model is required", param="model", code="model_required")
    if not isinstance(name, str):
        raise ApiError(400, "invalid parameter 'model': must be a string", param="model")
    return name


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    gw = gateway_of(request)

    def read() -> list[dict[str, Any]]:
        out = []
        for ref in store.list_models():
            try:
                out.append(_entry(ref, _info(ref)))
            except (ModelStoreError, OSError) as e:  # a registered file removed behind our back
                log.warning("skipping %s in /api/tags: %s", ref.name, e)
        return out

    return JSONResponse({"models": await _store_read(gw, "listing the models", read)})


@router.post("/api/show")
async def show(request: Request) -> Response:
    gw = gateway_of(request)
    name = _name(await read_json(request))

    def read() -> dict[str, Any]:
        try:
            ref = store.resolve_model(name)
            info = _info(ref)
        except ModelStoreError as e:
            raise _store_error(e, name) from None
        m = gw.pool.find(name)
        ctx = m.gw.engine.context_length if m else info.get("context_length")
        params = ["temperature 0.8", "top_k 40", "top_p 0.9"] + ([f"num_ctx {ctx}"] if ctx else [])
        # Never a server path: a pulled model's Modelfile names the model itself.
        modelfile = f"# Modelfile generated by tandem\nFROM {ref.name}\n"
        extra: dict[str, Any] = {}
        d = ref.defaults
        if d is not None:
            modelfile = "# Modelfile generated by tandem\n" + d.modelfile()
            params = [
                ln.removeprefix("PARAMETER ")
                for ln in d.modelfile().splitlines()
                if ln.startswith("PARAMETER ")
            ]
            extra = {"system": d.system} if d.system is not None else {}
            if d.messages:
                extra["messages"] = list(d.messages)
        return extra | {
            "modelfile": modelfile,
            "parameters": "\n".join(params),
            "template": (d.template if d is not None and d.template else None)
            or info.get("chat_template")
            or "",
            "details": _details(info),
            "model_info": _model_info(info),
            # The served model's from its worker; another pulled model's from its architecture
            # (an encoder only embeds; the llama family does both). Every generative model takes
            # tools: through its template's tools section, or tandem's generic tools preamble.
            "capabilities": _with_tools(
                m.gw.capabilities
                if m
                else model_capabilities(
                    info.get("architecture") == "bert", pooling_type_embeds(info.get("pooling_type"))
                )
            ),
            "modified_at": rfc3339(ref.modified),
        }

    return JSONResponse(await _store_read(gw, f"reading model '{name}'", read))


def _with_tools(capabilities: list[str]) -> list[str]:
    return [*capabilities, "tools"] if "completion" in capabilities else list(capabilities)


@router.get("/api/ps")
async def ps(request: Request) -> Response:
    gw = gateway_of(request)
    entries = gw.pool.entries()
    models = await asyncio.gather(*(_ps_entry(gw, m) for m in entries))
    return JSONResponse({"models": list(models)})


async def _ps_entry(root: Gateway, m: Loaded) -> dict[str, Any]:
    gw = m.gw
    stats = await gw.stats()
    cfg = gw.engine.cfg

    def read() -> tuple[ModelRef, dict[str, Any]]:
        try:
            ref = store.resolve_model(gw.model_name)
        except ModelStoreError:
            ref = store.inspect_path(Path(cfg.model_path), gw.model_name)
        return ref, _info(ref)

    ref, info = await _store_read(root, "reading the loaded model", read)
    plan = stats.memory_plan if stats else gw.engine.ready_info.get("memory_plan", {})
    size = plan_bytes(plan) or ref.size_bytes
    on_gpu = str(plan.get("device", cfg.device)).startswith("cuda")
    expires = _NEVER if m.resident or m.expires_at is None else datetime.fromtimestamp(m.expires_at, UTC)
    tandem = {
        "device": plan.get("device", cfg.device),
        "worker_alive": bool(stats and stats.worker_alive and gw.engine.dead is None),
        "running": stats.running if stats else None,
        "waiting": stats.waiting if stats else None,
        "max_queue": stats.max_queue if stats else cfg.max_queue,
        "kv_blocks_used": stats.kv_blocks_used if stats else None,
        "kv_blocks_total": stats.kv_blocks_total if stats else None,
        "kv_blocks_cached": stats.kv_blocks_cached if stats else None,
        "overlap": cfg.overlap,
        "memory_plan": plan,
        "planned_bytes": m.estimate,  # what the gateway counted against its budget before loading
        "in_flight": m.in_flight,
        "resident": m.resident,
        "load_seconds": round(gw.engine.load_seconds, 3),
        "zmq": list(gw.settings.zmq_endpoints) if m.resident else [],
        "pid": gw.settings.extra.get("pid"),
    }
    return {
        "name": gw.model_name,
        "model": gw.model_name,
        "size": size,
        "digest": ref.sha256 or "",
        "details": _details(info),
        "expires_at": rfc3339(expires),
        "size_vram": size if on_gpu else 0,
        "context_length": gw.engine.context_length,
        "tandem": tandem,
    }


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version(request: Request) -> Response:
    # Clients gate features on ollama's version number, so the answer is the ollama release whose
    # API tandem follows; tandem's own version rides along in a field of its own.
    return JSONResponse({"version": OLLAMA_API_VERSION, "tandem": gateway_of(request).settings.version})


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json(request)
    name = _name(body)
    stream = get_bool(body, "stream", True)
    if not stream:
        await _pull(gw, name)
        return JSONResponse({"status": "success"})
    return CancellableStream(
        _pull_lines(gw, name), "application/x-ndjson", error_frame=lambda m: ndjson({"error": m})
    )


async def _pull(gw: Gateway, name: str) -> ModelRef:
    # local_dirs: a client's local path must lie in a folder the operator allowed (none by default).
    fn = functools.partial(store.pull_model, name, False, local_dirs=gw.settings.local_model_dirs)
    try:
        return await _store_write(gw, f"pulling '{name}'", gw.settings.pull_timeout, fn)
    except ModelStoreError as e:
        raise _store_error(e, name) from None
    except OSError as e:
        raise ApiError(400, f"cannot pull '{name}': {e.strerror or type(e).__name__}") from None


async def _pull_lines(gw: Gateway, name: str) -> AsyncIterator[bytes]:
    yield ndjson({"status": "pulling manifest"})
    try:
        ref = await _pull(gw, name)
    except ApiError as e:
        yield ndjson({"error": e.message})
        return
    digest = f"sha256:{ref.sha256}" if ref.sha256 else ""
    yield ndjson(
        {
            "status": f"pulling {(ref.sha256 or ref.name)[:12]}",
            "digest": digest,
            "total": ref.size_bytes,
            "completed": ref.size_bytes,
        }
    )
    yield ndjson({"status": "verifying sha256 digest"})
    yield ndjson({"status": "writing manifest"})
    yield ndjson({"status": "success"})


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    gw = gateway_of(request)
    name = _name(await read_json(request))
    if (m := gw.pool.find(name)) is not None:
        how = "stop the server first" if m.resident else f"unload it first (`tandem stop {name}`)"
        raise ApiError(400, f"cannot delete '{name}': this server has it loaded; {how}")
    try:
        await _store_write(gw, f"deleting '{name}'", gw.settings.store_timeout, store.remove_model, name)
    except ModelStoreError as e:
        raise _store_error(e, name) from None
    gw.forget_derived()
    return Response(status_code=200)


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json(request)
    source, destination = _named(body, "source"), _named(body, "destination")
    try:
        await _store_write(
            gw, f"copying '{source}'", gw.settings.store_timeout, store.copy_model, source, destination
        )
    except ModelStoreError as e:
        raise _store_error(e, source) from None
    gw.forget_derived()
    return Response(status_code=200)


# Fields of /api/create that ask for what only a model build could give (new weights, adapters).
_CREATE_REFUSED = {"files": "uploaded model files", "adapters": "LoRA adapters", "quantize": "requantizing"}


@router.post("/api/create")
async def create(request: Request) -> Response:
    """ollama's create: `from` plus `system`, `parameters`, `template`, `messages`, `license`
    (today's API), or the older `modelfile` text; the new model shares its base's file."""
    gw = gateway_of(request)
    body = await read_json(request)
    name = _named(body, "model") if body.get("model") is not None else _named(body, "name")
    for field, what in _CREATE_REFUSED.items():
        if body.get(field):
            raise ApiError(
                400, f"invalid parameter '{field}': {what} are not supported; use 'from'", param=field
            )
    try:
        defaults = _create_defaults(body)
        ref = await _store_write(
            gw, f"creating '{name}'", gw.settings.store_timeout, store.create_model, name, defaults
        )
    except ModelStoreError as e:
        raise _store_error(e, body.get("from") or name) from None
    gw.forget_derived()
    statuses = [f"using existing layer sha256:{ref.sha256 or ''}", "writing manifest", "success"]
    if not get_bool(body, "stream", True):
        return JSONResponse({"status": "success"})
    return Response(b"".join(ndjson({"status": s}) for s in statuses), media_type="application/x-ndjson")


def _create_defaults(body: dict[str, Any]) -> ModelDefaults:
    text = body.get("modelfile")
    if text is not None:
        if not isinstance(text, str):
            raise ApiError(400, "invalid parameter 'modelfile': must be a string", param="modelfile")
        return parse_modelfile(text)[1]
    base = _named(body, "from")
    license_ = body.get("license")
    if isinstance(license_, list):
        license_ = "\n".join(str(x) for x in license_)
    for field in ("system", "template"):
        if body.get(field) is not None and not isinstance(body[field], str):
            raise ApiError(400, f"invalid parameter '{field}': must be a string", param=field)
    return ModelDefaults(
        base=base,
        system=body.get("system"),
        template=body.get("template"),
        parameters=check_parameters(body.get("parameters") or {}),
        messages=check_messages(body.get("messages") or []),
        license=license_,
    )


def _named(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"invalid parameter '{field}': a model name is required", param=field)
    check_name(value, field)
    return value
