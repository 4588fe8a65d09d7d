"""Checkpoint writes that never leave a half-written directory where a good one was.

Everything is written into a temporary sibling directory, flushed, and renamed into place only when complete.
An existing checkpoint at the destination is swapped with the new one in one atomic ``renameat2(...,
RENAME_EXCHANGE)`` (Linux), so the destination always holds a complete checkpoint, old or new. Where the
exchange is unavailable, the old checkpoint is moved aside first and removed only after the rename succeeded;
a crash between the two renames leaves it in a ``.old`` sibling that :func:`recover` (called by the next
write) puts back. Stale ``.tmp`` siblings are cleaned up by the next write.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import SliceGPTError

logger = logging.getLogger(__name__)


class OutputExistsError(SliceGPTError):
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


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a power loss after it cannot undo it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns ``False`` where the system or file system cannot (then the caller falls back to two renames).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def recover(target: str | os.PathLike) -> None:
    """Undo an interrupted write: restore a moved-aside checkpoint, drop unfinished temporaries."""
    target = Path(target).absolute()
    olds = sorted(target.parent.glob(f".{target.name}.*.old"))
    if olds and not target.exists():
        logger.warning("Restoring %s from an interrupted write", target)
        os.replace(olds.pop(), target)
    for stale in [*olds, *target.parent.glob(f".{target.name}.*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)


def publish_directory(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished directory ``source`` to ``target`` in one atomic step, replacing any ``target``.

    ``source`` must be on the same file system (a sibling of ``target``); its files are flushed first. An
    existing ``target`` is swapped out atomically and then removed (without the exchange: moved aside and
    removed after the rename; :func:`recover` undoes a crash between the two renames).
    """
    source, target = Path(source).absolute(), Path(target).absolute()
    _fsync_tree(source)
    if target.exists() and _exchange(source, target):
        fsync_dir(target.parent)
        shutil.rmtree(source, ignore_errors=True)  # it now holds the old checkpoint
    elif target.exists():
        old = target.parent / f".{target.name}.{os.getpid()}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        try:
            os.replace(source, target)
        except BaseException:
            os.replace(old, target)
            raise
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
        fsync_dir(target.parent)
    return target


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
        publish_directory(tmp, target)
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


__all__ = [
    "OutputExistsError",
    "atomic_directory",
    "check_output_dir",
    "publish_directory",
    "recover",
    "write_checkpoint",
]
