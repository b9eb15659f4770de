"""One logging setup for every tandem process, so interleaved lines say which process wrote them."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"


def configure_logging(level: int, fmt: str = FORMAT) -> None:
    """Send tandem's loggers to stderr at ``level``; safe to call again (replaces its own handler).

    Only the "tandem" logger: a root handler would print third-party lines twice where those
    libraries install handlers of their own.
    """
    log = logging.getLogger("tandem")
    for old in [h for h in log.handlers if getattr(h, "_tandem_actor_log", False)]:
        log.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler._tandem_actor_log = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)
