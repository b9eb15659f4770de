"""What every route shares: the engine, the settings, the metrics, and the model-name rules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from starlette.requests import Request

from tandem import __version__
from tandem.engine.aio import AsyncEngine
from tandem.engine.router import EngineError
from tandem.gateway.http.errors import ApiError, from_engine_error
from tandem.gateway.http.metrics import Metrics
from tandem.gateway.http.model_pool import ModelPool, parse_keep_alive
from tandem.gateway.http.params import bad
from tandem.gateway.http.store_calls import StoreLane
from tandem.messages import ErrorCode, Stats
from tandem.prompts.build import chat_ids, prompt_ids
from tandem.prompts.chat_template import ChatTemplateError
from tandem.store.modelfile import ModelDefaults
from tandem.tokenizer.build import TokenizerError
from tandem.validation import ContextError, InvalidParameterError, check_prompt_ids, fit_context

log = logging.getLogger(__name__)

DERIVED_TTL_S = 5.0
_INLINE_TOKENIZE_CHARS = 4096  # longer inputs are tokenized in a thread so the loop keeps streaming


@dataclass
class HttpSettings:
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides loopback ones
    origins: tuple[str, ...] = ()  # Origin patterns allowed besides local pages and apps ('*': all)
    max_body_bytes: int = 8 * 2**20
    # Control-token text in chat messages is read as control tokens (the template injection that
    # most servers allow); off by default, so only the template's own markup yields them.
    special_in_messages: bool = False
    send_timeout: float = 10.0  # seconds a streamed write may wait on a client that stopped reading
    aliases: tuple[str, ...] = ()  # more names the loaded model answers to
    zmq_endpoints: tuple[str, ...] = ()
    bind_host: str = "127.0.0.1"  # the address HTTP is bound to: also an accepted Host name
    local_model_dirs: tuple[Path, ...] = ()  # the only folders /api/pull may take local files from
    store_timeout: float = 30.0  # seconds a store read or delete may take before the client gets a 504
    pull_timeout: float = 3600.0  # the same for a pull, which may download gigabytes
    version: str = __version__
    # Multi-model serving (tandem.gateway.http.model_pool): seconds a model stays loaded after its last
    # request (None: forever), most models loaded at once (0: as many as the memory fits), and the
    # memory budget in bytes for their plans (0: what the system has available).
    keep_alive: float | None = 300.0
    max_loaded_models: int = 0
    memory_limit: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _canonical(name: str) -> str | None:
    from tandem.errors import ModelStoreError
    from tandem.store.registry import canonical_name

    try:
        return canonical_name(name)
    except ModelStoreError:
        return None


def check_name(name: str, param: str = "model") -> None:
    """400 naming ``param`` when ``name`` cannot be a model name at all (rather than a 404)."""
    from tandem.errors import InvalidModelNameError
    from tandem.store.registry import canonical_name

    try:
        canonical_name(name)
    except InvalidModelNameError as e:
        raise bad(param, str(e)) from None


def model_capabilities(encoder: bool, embeds: bool) -> list[str]:
    """ollama's capability names ("tools" aside: ollama_models adds it to every generative model):
    "completion" unless the model is an encoder, "embedding" where it embeds (ModelConfig.embeds)."""
    return ([] if encoder else ["completion"]) + (["embedding"] if embeds else [])


class Gateway:
    """One loaded model's view: its engine and tokenizer rules. The server's own model's Gateway
    is the app's; the others (``shared`` set) share its settings, metrics, store lanes and pool."""

    def __init__(self, engine: AsyncEngine, settings: HttpSettings, shared: Gateway | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.draining = False  # set by serve's shutdown: every new HTTP request is refused (503)
        if shared is None:
            self.metrics = Metrics()
            # Separate lanes: pulls (minutes long, and waiting on each other's locks) never hold up
            # the reads behind /api/tags and /api/show.
            self.store_reads = StoreLane("store-read", 4)
            self.store_writes = StoreLane("store-write", 2)
        else:
            self.metrics = shared.metrics
            self.store_reads, self.store_writes = shared.store_reads, shared.store_writes
            self.pool = shared.pool
        cfg = engine.cfg
        self.model_name = cfg.model_name or Path(cfg.model_path).stem
        # The aliases name the server's own model only.
        names = {self.model_name, *(settings.aliases if shared is None else ())}
        self.accepted = names | {c for n in names if (c := _canonical(n))}
        self._derived: dict[str, tuple[float, ModelDefaults | None]] = {}  # name -> (seen at, defaults)
        self._ll_tok: Any = None  # llguidance's view of the tokenizer, built on first use
        self._grammars_ok: dict[tuple[str, str], None] = {}  # grammars that compiled, oldest first
        if shared is None:
            s = settings
            self.pool = ModelPool(self, s.keep_alive, s.max_loaded_models, s.memory_limit)

    # -- models --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> list[str]:
        """ollama's capability names for the served model: "completion" unless it is an encoder,
        "embedding" where it embeds (the worker says which)."""
        model = self.engine.ready_info.get("model") or {}
        return model_capabilities(bool(model.get("encoder")), bool(model.get("embeds")))

    @property
    def embedding_dims(self) -> int:
        return int((self.engine.ready_info.get("model") or {}).get("embedding_length") or 0)

    def check_generates(self, model: str) -> None:
        if "completion" not in self.capabilities:
            raise ApiError(400, f"model '{model}' does not support generate", param="model")

    def serves(self, name: str) -> bool:
        return name in self.accepted or _canonical(name) in self.accepted

    async def open_model(self, request: Request, body: dict[str, Any]) -> tuple[Gateway, str]:
        """The Gateway of the model the request names, loading it when it is pulled but not
        loaded, and the name; the request holds the model (no eviction) until its response ends,
        after which its ``keep_alive`` (or the server's) starts counting."""
        name = body.get("model")
        if name is None or name == "":
            raise ApiError(400, "model is required", param="model", code="model_required")
        if not isinstance(name, str):
            raise ApiError(400, "invalid parameter 'model': must be a string", param="model")
        keep_alive: Any = "default"
        if body.get("keep_alive") is not None:
            keep_alive = parse_keep_alive(body["keep_alive"])
        entry = self.pool.find(name)
        if entry is None:
            check_name(name)
            path = await self._pulled_path(name)
            entry = await self.pool.get(_canonical(name) or name, path)
        gw = entry.gw
        if not gw.serves(name):
            gw._derived_from_served(name)  # its defaults, when it is a derived model
        self.pool.acquire(entry)
        request.scope.setdefault("state", {}).setdefault("model_leases", []).append(
            (self.pool, entry, keep_alive)
        )
        return gw, name

    async def _pulled_path(self, name: str) -> str:
        from tandem.errors import ModelStoreError
        from tandem.store.model_store import resolve_model

        try:
            ref = await asyncio.to_thread(resolve_model, name)
        except ModelStoreError:
            raise self.not_found(name) from None
        return str(ref.path)

    def defaults_of(self, name: str) -> ModelDefaults | None:
        """A derived model's request defaults (system, parameters, template, messages), if any."""
        hit = self._derived.get(name)
        return hit[1] if hit else None

    def forget_derived(self) -> None:
        """After a create, copy or delete through this server: look the names up again."""
        for m in self.pool.entries():
            m.gw._derived.clear()

    def _derived_from_served(self, name: str) -> bool:
        """Whether ``name`` is a copy or derived model of the loaded one (same weights file). The
        answer is kept for DERIVED_TTL_S, so that `tandem create` in another process shows soon."""
        from tandem.errors import ModelStoreError
        from tandem.store.model_store import resolve_model

        hit = self._derived.get(name)
        if hit is not None and time.monotonic() - hit[0] < DERIVED_TTL_S:
            return True
        try:
            ref = resolve_model(name)
            same = os.path.samefile(ref.path, self.engine.cfg.model_path)
        except (ModelStoreError, OSError):
            same = False
        if same:
            self._derived[name] = (time.monotonic(), ref.defaults)
        else:
            self._derived.pop(name, None)
        return same

    def not_found(self, name: str) -> ApiError:
        return ApiError(404, f"model '{name}' not found", param="model", code="model_not_found")

    # -- prompts -------------------------------------------------------------------------------
    async def encode_prompt(
        self, prompt: str, raw: bool, system: str | None, template: str | None = None
    ) -> list[int]:
        tok = self.engine.tokenizer
        special = self.settings.special_in_messages
        fn = partial(prompt_ids, tok, prompt, raw, system, special, template)
        return await self._off_loop(len(prompt), fn)

    async def encode_chat(
        self, messages: list[dict[str, Any]], template: str | None = None, **template_kwargs: Any
    ) -> list[int]:
        size = sum(len(str(m.get("content") or "")) for m in messages)
        size += len(str(template_kwargs.get("tools") or ""))
        special = self.settings.special_in_messages
        fn = partial(chat_ids, self.engine.tokenizer, messages, special, template=template, **template_kwargs)
        return await self._off_loop(size, fn)

    # -- structured output ---------------------------------------------------------------------
    async def constrain(self, params: Any, grammar: tuple[str, str] | None, param: str) -> None:
        """Put ``grammar`` on ``params`` after compiling it once for this model's tokenizer (in
        a thread: a big schema must not hold up the loop), so that a grammar the worker could not
        compile is a 400 naming the problem, never a failure mid-generation."""
        if grammar is None:
            return
        from tandem.grammar.compile import GrammarError, check

        kind, text = grammar
        try:
            if grammar not in self._grammars_ok:
                await asyncio.to_thread(check, kind, text, await self._ll_tokenizer())
                self._grammars_ok[grammar] = None
                while len(self._grammars_ok) > 256:  # the oldest checks go first
                    del self._grammars_ok[next(iter(self._grammars_ok))]
        except GrammarError as e:
            msg = f"invalid parameter '{param}': {e}"
            raise ApiError(400, msg, param=param, code="invalid_grammar") from None
        params.grammar_kind, params.grammar = kind, text

    async def _ll_tokenizer(self) -> Any:
        if self._ll_tok is None:
            from tandem.grammar.tokenizer import ll_tokenizer

            try:
                self._ll_tok = await asyncio.to_thread(ll_tokenizer, self.engine.tokenizer)
            except Exception as e:  # a vocabulary llguidance cannot take: no structured output here
                msg = f"structured output is not available for this model's tokenizer: {e}"
                raise ApiError(400, msg, code="invalid_grammar") from None
        return self._ll_tok

    async def _off_loop(self, size: int, fn: Callable[[], list[int]]) -> list[int]:
        try:
            if size > _INLINE_TOKENIZE_CHARS:
                return await asyncio.to_thread(fn)
            return fn()
        except ChatTemplateError as e:
            raise ApiError(400, f"chat template: {e}", param="messages") from None
        except TokenizerError as e:
            raise ApiError(400, f"cannot tokenize the input: {e}") from None

    def check_token_ids(self, ids: list[Any], param: str) -> list[int]:
        try:
            return check_prompt_ids(ids, self.engine.tokenizer.vocab_size, param)
        except InvalidParameterError as e:
            raise ApiError(400, str(e), param=param, code="invalid_parameter") from None

    def fit_context(
        self, n_prompt: int, max_tokens: int | None, num_ctx: int | None, clamp: bool
    ) -> int | None:
        """max_tokens that fits the context (``num_ctx``, when smaller than the engine's); 400 with
        both counts when the request does not (tandem.validation.fit_context, ``clamp`` as there)."""
        full = self.engine.context_length
        ctx = num_ctx if num_ctx is not None and num_ctx < full else full
        try:
            fitted = fit_context(n_prompt, max_tokens, ctx, clamp)
        except ContextError as e:
            code = "context_length_exceeded" if e.code == ErrorCode.CONTEXT_LENGTH else None
            raise ApiError(400, str(e), param=e.param, code=code) from None
        if fitted is None and ctx < full:
            return ctx - n_prompt  # a smaller num_ctx ends generation where it is full
        return fitted

    # -- engine --------------------------------------------------------------------------------
    async def stats(self, timeout: float = 2.0) -> Stats | None:
        with contextlib.suppress(EngineError, TimeoutError, asyncio.TimeoutError):
            return await self.engine.stats(timeout=timeout)
        return None

    async def api_error(self, e: EngineError) -> ApiError:
        return from_engine_error(e)


def gateway_of(request: Request) -> Gateway:
    """The Gateway that build_app put on the application."""
    return request.app.state.gateway
