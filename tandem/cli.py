"""The `tandem` command line. Commands stay thin: parse options, call the library, print.

Every command lives in `tandem.commands`; `_register_commands` adds it to the group. Library
errors that are the user's to fix (ModelStoreError, UnsupportedModelError, and whatever is added to
USER_ERRORS) become `Error: <one line>` on stderr and exit status 1, without a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from tandem import __version__
from tandem.errors import ModelStoreError, UnsupportedModelError

USER_ERRORS: tuple[type[Exception], ...] = (ModelStoreError, UnsupportedModelError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(" ".join(str(e).split())) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tandem")
@click.option("-v", "--verbose", count=True, help="Log more: -v info, -vv debug.")
def main(verbose: int) -> None:
    """tandem: an LLM inference server whose scheduler and GPU worker run in tandem."""
    _setup_logging(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)


def _setup_logging(level: int) -> None:
    # Only tandem's loggers: libraries such as huggingface_hub print through their own handlers, and a
    # root handler would print each of their lines twice.
    log = logging.getLogger("tandem")
    for old in [h for h in log.handlers if getattr(h, "_tandem_cli", False)]:
        log.removeHandler(old)  # bound to an earlier sys.stderr (repeated in-process invocations)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._tandem_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)


def _register_commands() -> None:
    # Each command module imports what it needs lazily inside, so `tandem list` stays fast.
    from tandem.commands.bench import bench
    from tandem.commands.generate import generate
    from tandem.commands.ps import ps
    from tandem.commands.run import run
    from tandem.commands.serve import serve
    from tandem.commands.stop import stop
    from tandem.commands.store import cp, create, list_, pull, rm, show
    from tandem.commands.stress import stress
    from tandem.commands.tokenize import tokenize

    main.add_command(bench)
    main.add_command(cp)
    main.add_command(create)
    main.add_command(list_)
    main.add_command(pull)
    main.add_command(rm)
    main.add_command(show)
    main.add_command(generate)
    main.add_command(ps)
    main.add_command(run)
    main.add_command(serve)
    main.add_command(stop)
    main.add_command(stress)
    main.add_command(tokenize)


_register_commands()

if __name__ == "__main__":
    main()
