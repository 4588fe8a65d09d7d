"""The ``hf-slicegpt`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (the handler, ``func(args) -> int``). Adding a sub-command is one new module plus its
name in :data:`SUBCOMMANDS`.

Heavy imports (torch, transformers) happen inside the handlers, so ``hf-slicegpt --help`` stays fast.
Errors reach the user as one line on stderr and a non-zero exit status; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ._common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    PROG,
    add_logging_options,
    configure_logging,
    error_line,
    progress_bars,
)

# Sub-command modules, in the order ``--help`` lists them. Add a module name here to add a sub-command.
SUBCOMMANDS: list[str] = ["slice", "eval", "generate", "info", "demo", "rft", "push", "export"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SliceGPT for Hugging Face transformers: slice, evaluate, inspect and try sliced models.",
        epilog="Run `hf-slicegpt COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_logging_options(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f".{name}", __name__).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-slicegpt`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2, as argparse does
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    configure_logging(verbose=verbose, quiet=quiet)
    try:
        with progress_bars(enabled=not quiet):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line, no traceback unless --verbose
        if verbose:
            logger.exception("%s failed", args.command)
        print(error_line(exc, verbose=verbose), file=sys.stderr)
        return EXIT_ERROR


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
