"""What every sub-command shares: logging options, error lines, device and dtype choices, small formatters."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

PROG = "hf-slicegpt"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
DTYPE_CHOICES = ("float32", "bfloat16", "float16")

_HANDLER_NAME = "hf-slicegpt-cli"
_QUIET_LIBRARIES = ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock", "httpx", "torch")


def add_logging_options(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``--quiet`` / ``--verbose``, accepted before or after the sub-command name.

    On sub-parsers the default is ``SUPPRESS`` so that a flag given before the sub-command is not reset.
    """
    default: Any = False if top_level else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="only warnings and errors; no progress bars",
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logs, and tracebacks on errors"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only for defaults worth showing (not ``None``/``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_parser(
    subparsers: Any, name: str, *, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A sub-command parser that also takes the logging options."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        formatter_class=HelpFormatter,
    )
    add_logging_options(parser)
    return parser


def configure_logging(*, verbose: bool, quiet: bool) -> None:
    """Log hf_slicegpt at INFO (DEBUG with ``--verbose``, WARNING with ``--quiet``); libraries at WARNING.

    Idempotent: calling ``main()`` repeatedly in one process does not stack handlers.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    ours = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("hf_slicegpt").setLevel(ours)
    # Quiet: a library's error log only repeats the exception that becomes our one-line message.
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(
            logging.INFO if verbose else logging.CRITICAL if quiet else logging.WARNING
        )
    if quiet:  # `datasets` sets its own level when imported (later, lazily): it reads this variable then
        os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    if "transformers" in sys.modules or verbose or quiet:
        _configure_transformers(verbose=verbose, quiet=quiet)


def _configure_transformers(*, verbose: bool, quiet: bool) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(
        hf_logging.INFO if verbose else hf_logging.ERROR if quiet else hf_logging.WARNING
    )
    if quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Force every tqdm bar off while ``enabled`` is False, even those a library creates with ``disable=False``."""
    if enabled:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = silent_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original  # type: ignore[method-assign]


def error_line(exc: BaseException, *, verbose: bool = False) -> str:
    """``hf-slicegpt: error: <message>`` on one line, with a hint to ``--verbose`` for unexpected errors."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    expected = isinstance(exc, (ValueError, OSError, ImportError, LookupError))
    if not expected:
        message = f"{type(exc).__name__}: {message}"
        if not verbose:
            message += " (run with --verbose for the traceback)"
    return f"{PROG}: error: {message}"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def sparsity_fraction(text: str) -> float:
    """argparse type: a number (its range is checked by ``SlicingConfig``); ``25%`` is refused with the fraction."""
    stripped = text.strip()
    try:
        return float(stripped)
    except ValueError:
        pass
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            percent = None
        if percent is not None:
            raise argparse.ArgumentTypeError(
                f"{text!r} is a percentage; pass the fraction of the hidden size to remove, e.g. {percent / 100:g}"
            )
    raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) such as 0.25, got {text!r}")


def human_count(n: int | float) -> str:
    """``134515008`` -> ``134.5M``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def add_text_source_options(parser: argparse.ArgumentParser, *, split_help: str) -> None:
    """``--text-column``, ``--split``, ``--subset`` for Hub datasets and local jsonl/json/parquet files."""
    parser.add_argument(
        "--text-column", default=None, help="column holding the text (Hub datasets, .jsonl/.json/.parquet)"
    )
    parser.add_argument("--split", default=None, help=split_help)
    parser.add_argument("--subset", default=None, help="dataset configuration name on the Hub")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default=None, help="weights dtype (default: the checkpoint's)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code shipped with the model or its tokenizer (auto_map); off by default, never needed for "
        "sliced checkpoints or supported families",
    )
