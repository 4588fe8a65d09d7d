"""Checkpoint writes that never leave a half-written directory where a good one was.

Everything is written into a temporary sibling directory, flushed, and renamed into place only when complete.
An existing checkpoint at the destination is swapped with the new one in one atomic ``renameat2(...,
RENAME_EXCHANGE)`` (Linux), so the destination always holds a complete checkpoint, old or new. Where the
exchange is unavailable, the old checkpoint is moved aside first and removed only after the rename succeeded;
a crash between the two renames leaves it in a ``.old`` sibling that :func:`recover` (called by the next
run's output check) puts back. Stale ``.tmp`` siblings (directories, or the symlink an exchange swapped out) of a
process that is gone are removed by that check too.

Never delete what is not ours: ``overwrite`` replaces only an empty directory or a checkpoint hf-slicegpt wrote
(:func:`is_own_checkpoint`), never the current directory, the input model or a directory containing either.
Temporary names stay within the file-system's name limit (a hash stands in for a long output name).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import SliceGPTError
from .names import NATIVE_EXPORT_KEY, REPORT_NAME, RFT_REPORT_NAME, SLICED_MODEL_TYPE

logger = logging.getLogger(__name__)


NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
# Room kept for what a temporary sibling adds to the output's name: ".{pid}-{random}.tmp", ".{pid}.old", ".partial".
_SUFFIX_ROOM = 40
# Files only hf-slicegpt writes into a checkpoint; one of them (or a sliced config) marks a directory as ours.
OWN_MARKER_FILES = (REPORT_NAME, RFT_REPORT_NAME)


class OutputPathError(SliceGPTError):
    """The output path cannot be written (a file in the way, a name too long, no permission)."""


class OutputExistsError(OutputPathError):
    """The output directory exists and may not be replaced (not empty without overwrite, or not ours)."""


def temp_stem(target: str | os.PathLike) -> str:
    """Start of every temporary sibling's name of ``target``: ``.NAME``, or a short hash of a long ``NAME``.

    Why: a 245-byte output name is legal, but ``.NAME.123-abcd.tmp`` would exceed NAME_MAX (``[Errno 36]``).
    """
    name = Path(target).name
    if len(os.fsencode(name)) + 1 + _SUFFIX_ROOM <= NAME_MAX:
        return f".{name}"
    return ".slicegpt-" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        value = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_own_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is empty or holds a checkpoint hf-slicegpt wrote, which ``overwrite`` may replace.

    Ours: a slicing or RFT report, a ``config.json`` of ``model_type`` ``slicegpt``, or a native export's
    config (it carries :data:`NATIVE_EXPORT_KEY`).
    """
    directory = Path(directory)
    if not any(directory.iterdir()):
        return True
    if any((directory / name).is_file() for name in OWN_MARKER_FILES):
        return True
    config = _read_config(directory)
    return config.get("model_type") == SLICED_MODEL_TYPE or NATIVE_EXPORT_KEY in config


def check_output_writable(path: str | os.PathLike) -> Path:
    """Refuse an output that cannot be created: a name over NAME_MAX, a regular file among its parents, a
    parent without write permission. Run before any slow work, so the failure costs a second, not the run."""
    absolute = Path(os.path.abspath(path))
    if not absolute.name:
        raise OutputPathError(f"output {str(path)!r} must name a directory, not a file-system root")
    existing = absolute
    while not os.path.lexists(existing) and existing != existing.parent:
        size = len(os.fsencode(existing.name))
        if size > NAME_MAX:
            raise OutputPathError(
                f"output {str(path)!r}: the name {existing.name[:24]!r}... is {size} bytes, over the file-system "
                f"limit of {NAME_MAX}; choose a shorter name"
            )
        existing = existing.parent
    parent = existing if existing != absolute else absolute.parent
    if existing != absolute and not existing.is_dir():
        raise OutputPathError(
            f"cannot create output {str(path)!r}: {str(existing)!r} is a file, not a directory; choose another path"
        )
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write output {str(path)!r}: no write permission in {str(parent)!r}; choose another directory"
        )
    return Path(path)


def _is_local(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and bool(str(source)) and os.path.exists(source)


def check_output_dir(
    path: str | os.PathLike, overwrite: bool, *, inputs: Sequence[str | os.PathLike | None] = ()
) -> Path:
    """Check ``path`` can take a new checkpoint, before any slow work; say how to proceed if not.

    - it can be created (:func:`check_output_writable`); stale temporaries of an earlier run are cleaned up;
    - it is not the current directory, an input (``inputs``: the model read, a local path) or a directory
      containing one of them, whatever ``overwrite`` says;
    - an existing non-empty directory needs ``overwrite``, and is replaced only if :func:`is_own_checkpoint`.
    """
    path = Path(path)
    check_output_writable(path)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise OutputExistsError(
            f"output {str(path)!r} is the current directory or contains it, which hf-slicegpt never replaces; "
            "choose a new directory, e.g. ./sliced"
        )
    for source in inputs:
        if _is_local(source):
            source_path = Path(source).resolve()  # type: ignore[arg-type]
            if source_path == resolved or source_path.is_relative_to(resolved):
                raise OutputExistsError(
                    f"output {str(path)!r} is or contains the input model {str(source)!r}, which must never be "
                    "replaced; choose another output directory"
                )
    if resolved.parent.is_dir():
        recover(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"output directory {str(path)!r} exists and is not empty; pass --overwrite (overwrite=True) "
                "or choose another directory"
            )
        if not is_own_checkpoint(path):
            sample = ", ".join(sorted(p.name for p in path.iterdir())[:3])
            raise OutputExistsError(
                f"--overwrite replaces only an empty directory or a checkpoint hf-slicegpt wrote, and "
                f"{str(path)!r} holds other files ({sample}...); move them or choose another directory"
            )
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


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


def _remove(path: Path) -> None:
    """Delete a temporary sibling: a directory tree, or the symlink/file an exchange swapped out."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own temporaries are never in flight when a check runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's
    return True


def _writer_pid(stale: Path, stem: str) -> int | None:
    """The pid in ``STEM.PID-RANDOM.tmp`` (None for other names, which no running write can own)."""
    middle = stale.name[len(stem) + 1 :].split("-", 1)[0]
    return int(middle) if middle.isdigit() else None


def recover(target: str | os.PathLike) -> None:
    """Undo an interrupted write: restore a moved-aside checkpoint, drop temporaries of processes gone."""
    target = Path(target).absolute()
    stem = glob.escape(temp_stem(target))
    olds = sorted(target.parent.glob(f"{stem}.*.old"))
    if olds and not os.path.lexists(target):
        logger.warning("Restoring %s from an interrupted write", target)
        os.replace(olds.pop(), target)
    temporaries = []
    for stale in target.parent.glob(f"{stem}.*.tmp"):
        pid = _writer_pid(stale, temp_stem(target))
        if pid is None or not _alive(pid):
            temporaries.append(stale)
    for stale in [*olds, *temporaries]:
        logger.info("Removing %s, left by an interrupted write", stale)
        _remove(stale)


def publish_directory(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished directory ``source`` to ``target`` in one atomic step, replacing any ``target``.

    ``source`` must be on the same file system (a sibling of ``target``); its files are flushed first. An
    existing ``target`` is swapped out atomically and then removed (without the exchange: moved aside and
    removed after the rename; :func:`recover` undoes a crash between the two renames).
    """
    source, target = Path(source).absolute(), Path(target).absolute()
    _fsync_tree(source)
    if os.path.lexists(target) and _exchange(source, target):
        fsync_dir(target.parent)
        _remove(source)  # it now holds the old checkpoint (or the symlink that stood at target)
    elif os.path.lexists(target):
        old = target.parent / f"{temp_stem(target)}.{os.getpid()}.old"
        _remove(old)
        os.replace(target, old)
        try:
            os.replace(source, target)
        except BaseException:
            os.replace(old, target)
            raise
        fsync_dir(target.parent)
        _remove(old)
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
    check_output_dir(target, overwrite)  # also recovers an interrupted earlier write
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f"{temp_stem(target)}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    )
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the checkpoint gets the user's usual mode
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
    "NAME_MAX",
    "OutputExistsError",
    "OutputPathError",
    "atomic_directory",
    "check_output_dir",
    "check_output_writable",
    "is_own_checkpoint",
    "publish_directory",
    "recover",
    "temp_stem",
    "write_checkpoint",
]
