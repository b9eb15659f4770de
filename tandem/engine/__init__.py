"""The one client of the engine: what `serve`, `generate`, `bench` and the tests use to reach a
scheduler process.

- `process.EngineProcess` starts the scheduler (which starts the worker) and holds the two
  sockets to it.
- `router.Router` is the sans-IO core: it turns submits and cancels into frames and the
  scheduler's frames into events per request (`feed`), with one merge of deltas (`Completion`).
- `sync.SyncEngine` (blocking, for `generate`, `bench` and tests) and `aio.AsyncEngine` (asyncio,
  for the gateway, with any number of concurrent consumers) are thin wrappers around it.
"""

from tandem.engine.router import Completion, EngineError, Router

__all__ = ["Completion", "EngineError", "Router"]
