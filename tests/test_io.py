"""Atomic checkpoint directories: a good checkpoint is never replaced by a half-written one."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_slicegpt.checkpoint import io
from hf_slicegpt.checkpoint.io import (
    OutputExistsError,
    atomic_directory,
    check_output_dir,
    recover,
    write_checkpoint,
)


def _write(directory: Path, content: str) -> None:
    (directory / "config.json").write_text(content)
    (directory / "model.safetensors").write_text(content * 3)
    (directory / "slicing_report.json").write_text("{}")  # marks it as a checkpoint hf-slicegpt wrote


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_new_checkpoint_appears_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        _write(tmp, "new")
        assert not target.exists()  # nothing visible until the body finishes
    assert (target / "config.json").read_text() == "new"
    assert _siblings(target) == []


def test_failing_body_keeps_the_existing_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(target, overwrite=True) as tmp:
        _write(tmp, "half")
        raise RuntimeError("disk full")
    assert (target / "config.json").read_text() == "old"
    assert (target / "model.safetensors").read_text() == "old" * 3
    assert _siblings(target) == []  # the temporary directory is gone


def test_interrupt_keeps_the_existing_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, overwrite=True) as tmp:
        _write(tmp, "half")
        raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "old"
    assert _siblings(target) == []


def test_overwrite_replaces_everything(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "old")
    (target / "stale.txt").write_text("from the old checkpoint")
    with atomic_directory(target, overwrite=True) as tmp:
        _write(tmp, "new")
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "slicing_report.json",
    ]
    assert (target / "config.json").read_text() == "new"
    assert _siblings(target) == []


def test_overwrite_without_exchange_falls_back_to_two_renames(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "old")
    with atomic_directory(target, overwrite=True) as tmp:
        _write(tmp, "new")
    assert (target / "config.json").read_text() == "new"
    assert _siblings(target) == []


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "old")
    with pytest.raises(OutputExistsError, match="overwrite"), atomic_directory(target):
        pytest.fail("the body must not run")
    assert (target / "config.json").read_text() == "old"
    assert issubclass(OutputExistsError, ValueError)


def test_check_output_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, overwrite=False) == empty
    assert check_output_dir(tmp_path / "missing", overwrite=False) == tmp_path / "missing"
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_output_dir(file, overwrite=True)


def test_recover_restores_a_moved_aside_checkpoint(tmp_path: Path) -> None:
    """A crash between moving the old checkpoint aside and renaming the new one in leaves only ``.old``."""
    target = tmp_path / "out"
    old = tmp_path / ".out.4242.old"
    old.mkdir()
    _write(old, "old")
    unfinished = tmp_path / ".out.abc.tmp"
    unfinished.mkdir()
    _write(unfinished, "half")
    recover(target)
    assert (target / "config.json").read_text() == "old"
    assert _siblings(target) == []


def test_recover_keeps_a_complete_target(tmp_path: Path) -> None:
    """Crash after the new checkpoint was renamed in but before ``.old`` was removed: keep the new one."""
    target = tmp_path / "out"
    target.mkdir()
    _write(target, "new")
    old = tmp_path / ".out.4242.old"
    old.mkdir()
    _write(old, "old")
    recover(target)
    assert (target / "config.json").read_text() == "new"
    assert _siblings(target) == []


def test_next_write_recovers_first(tmp_path: Path) -> None:
    """atomic_directory calls recover(): a stale ``.old`` is restored, then refused without overwrite."""
    target = tmp_path / "out"
    old = tmp_path / ".out.7.old"
    old.mkdir()
    _write(old, "old")
    with pytest.raises(OutputExistsError), atomic_directory(target):
        pass
    assert (target / "config.json").read_text() == "old"


def test_recover_leaves_other_directories_alone(tmp_path: Path) -> None:
    other = tmp_path / ".other.1.old"
    other.mkdir()
    sibling = tmp_path / "out2"
    sibling.mkdir()
    recover(tmp_path / "out")
    assert other.exists() and sibling.exists()


def test_write_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "out"
    result = write_checkpoint(target, lambda directory: _write(directory, "new"))
    assert result == target and (target / "config.json").read_text() == "new"
    with pytest.raises(ValueError, match="boom"):
        write_checkpoint(target, lambda directory: (_ for _ in ()).throw(ValueError("boom")), overwrite=True)
    assert (target / "config.json").read_text() == "new"
