"""Checkpoint writes that never leave a half-written directory where a good one was.

Everything is written into a temporary sibling directory, flushed, and renamed into place only when complete.
An existing checkpoint at the destination is moved aside first and removed only after the rename succeeded,
so a crash at any point leaves either the old checkpoint or the new one (plus a stale ``.tmp``/``.old``
sibling that the next write cleans up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


class OutputExistsError(ValueError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output unless ``overwrite``; say how to proceed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {str(path)!r} exists and is not empty; pass --overwrite (overwrite=True) "
            "or choose another directory"
        )
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover(target: str | os.PathLike) -> None:
    """Undo an interrupted write: restore a moved-aside checkpoint, drop unfinished temporaries."""
    target = Path(target).absolute()
    olds = sorted(target.parent.glob(f".{target.name}.*.old"))
    if olds and not target.exists():
        logger.warning("Restoring %s from an interrupted write", target)
        os.replace(olds.pop(), target)
    for stale in [*olds, *target.parent.glob(f".{target.name}.*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; rename it into place on success.

    On an exception the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    if target.parent.is_dir():
        recover(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.{os.getpid()}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(
    target: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Run ``write(tmp_dir)`` and move the result to ``target`` atomically."""
    with atomic_directory(target, overwrite=overwrite) as tmp:
        write(tmp)
    logger.info("Wrote %s", target)
    return Path(target)


__all__ = ["OutputExistsError", "atomic_directory", "check_output_dir", "recover", "write_checkpoint"]
