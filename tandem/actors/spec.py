"""What an actor is (its spec) and how its start can fail; shared by the parent and child sides."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ActorSpec:
    """Everything needed to start one actor process. Must pickle: it crosses the spawn boundary."""

    name: str  # "scheduler", "worker", ...: names logs, socket files and error messages
    entry: str  # "package.module:function", imported in the child, called as function(ctx)
    config: Any  # picklable, handed to the entry as ctx.config
    runtime_dir: Path  # per-server 0700 directory for ipc:// socket files (make_runtime_dir)
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    ready_timeout: float = 300.0  # loading a model can take a while
    log_level: int = logging.INFO
    # After the parent dies the entry gets this long to return on its own before the child runs its
    # cleanups and exits anyway.
    exit_grace: float = 2.0

    def __post_init__(self) -> None:
        self.runtime_dir = Path(self.runtime_dir)
        if not self.name or "/" in self.name or not self.name.isprintable():
            raise ValueError(f"invalid actor name {self.name!r}")
        if ":" not in self.entry:
            raise ValueError(f"actor entry must look like 'package.module:function', got {self.entry!r}")
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError(
                "need 0 < heartbeat_interval < heartbeat_timeout, got "
                f"{self.heartbeat_interval} and {self.heartbeat_timeout}"
            )
        if self.ready_timeout <= 0 or self.exit_grace < 0:
            raise ValueError("ready_timeout must be positive and exit_grace non-negative")


class ActorStartError(RuntimeError):
    """The actor did not become ready: its exception, its exit, or a timeout (said in the message)."""

    def __init__(self, name: str, reason: str, traceback: str = "") -> None:
        super().__init__(f"actor '{name}' failed to start: {reason}")
        self.name = name
        self.reason = reason
        self.traceback = traceback  # the child's formatted traceback when it raised
