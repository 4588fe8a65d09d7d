"""No lost data: a writer killed with SIGKILL at any point leaves the old checkpoint or the new one, never a mix.

Two real tiny sliced checkpoints, A and B, are written over each other by child processes that are killed
(SIGKILL: no cleanup runs) at defined points of ``hf_slicegpt.checkpoint.io.write_checkpoint`` and after random delays.
What is left at the target must be byte-for-byte A or B and must load with ``from_pretrained``.

Most children load ``hf_slicegpt/checkpoint/io.py`` by path (stdlib only, so they start in milliseconds) and copy A's or B's
files slowly; one child runs the real ``save_pretrained`` path.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.checkpoint.io import recover, write_checkpoint

PACKAGE = Path(hf_slicegpt.__file__).parent
IO_PATH = PACKAGE / "checkpoint" / "io.py"

CHILD = r"""
import importlib.util, os, shutil, sys, time, types
from pathlib import Path

# The package's __init__ (torch, transformers) is skipped: bare package modules let io.py's relative import
# of the stdlib-only errors module resolve, so the child starts in milliseconds.
root = Path(sys.argv[1]).parents[1]
for name, path in (("hf_slicegpt", root), ("hf_slicegpt.checkpoint", root / "checkpoint")):
    package = types.ModuleType(name)
    package.__path__ = [str(path)]
    sys.modules[name] = package
spec = importlib.util.spec_from_file_location("hf_slicegpt.checkpoint.io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = io
spec.loader.exec_module(io)
point, target, ready = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
sources = [Path(p) for p in sys.argv[5:]]

def pause(name):
    if name == point:
        ready.write_text(name)
        time.sleep(120)

if os.environ.get("NO_EXCHANGE"):
    io._exchange = lambda a, b: False

exchange = io._exchange
def exchange_then_pause(a, b):
    done = exchange(a, b)
    if done:
        pause("swapped")
    return done
io._exchange = exchange_then_pause

fsync_tree = io._fsync_tree
def fsync_then_pause(root):
    fsync_tree(root)
    pause("synced")
io._fsync_tree = fsync_then_pause

replace = os.replace
calls = []
def replace_then_pause(a, b):
    replace(a, b)
    calls.append(a)
    pause("moved-aside" if len(calls) == 1 else "renamed")
io.os.replace = replace_then_pause

def copy_slowly(source):
    def write(tmp):
        for path in sorted(source.iterdir()):
            data = path.read_bytes()
            with open(tmp / path.name, "wb") as out:
                for start in range(0, len(data), 8192):
                    out.write(data[start : start + 8192])
                    out.flush()
                    if path.name == "model.safetensors" and start == 8192:
                        pause("writing")  # half-written weights in the temporary directory
    return write

i = 0
while True:
    io.write_checkpoint(target, copy_slowly(sources[i % len(sources)]), overwrite=True)
    i += 1
    if point == "loop":  # how many writes are complete: A first, then B, A, ...
        tmp_ready = ready.with_suffix(".tmp")
        tmp_ready.write_text(str(i))
        replace(tmp_ready, ready)  # the unpatched os.replace
"""

SAVE_CHILD = r"""
import sys
from pathlib import Path
import hf_slicegpt
from hf_slicegpt.checkpoint.io import write_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

target, ready, source = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(source)
tokenizer = AutoTokenizer.from_pretrained(source)

def write(tmp):
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)

ready.write_text("ready")
while True:
    write_checkpoint(target, write, overwrite=True)
"""


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    paths = {}
    for name, seed in (("A", 0), ("B", 1)):
        sliced = hf_slicegpt.slice_model(
            make_tiny("llama", seed=seed), calibration(), 0.25, round_to=4, show_progress=False
        )
        sliced.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _start(script: str, *args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def _wait_for(path: Path, child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited early: {child.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"child never reached {path.name}")
        time.sleep(0.01)


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def _left_is_old_or_new(target: Path, versions: dict[str, dict[str, str]]) -> str:
    found = _digest(target)
    matches = [name for name, digest in versions.items() if digest == found]
    assert matches, f"{target} holds a mix: {sorted(found)}"
    return matches[0]


@pytest.mark.parametrize(
    "point, exchange",
    [
        ("writing", True),
        ("synced", True),
        ("swapped", True),
        ("moved-aside", False),
        ("renamed", False),
    ],
)
def test_killed_at_each_step_leaves_old_or_new(
    checkpoints: dict[str, Path], tmp_path: Path, point: str, exchange: bool
) -> None:
    versions = {name: _digest(path) for name, path in checkpoints.items()}
    target = tmp_path / "out"
    write_checkpoint(target, lambda tmp: _copy_all(checkpoints["A"], tmp))
    ready = tmp_path / "ready"
    env = {} if exchange else {"NO_EXCHANGE": "1"}
    child = _start(CHILD, IO_PATH, point, target, ready, checkpoints["B"], env=env)
    _wait_for(ready, child, timeout=60)
    _kill(child)

    if exchange:
        # The atomic swap: the target holds a complete checkpoint at every instant, without any recovery.
        expected = {"writing": "A", "synced": "A", "swapped": "B"}[point]
        assert _left_is_old_or_new(target, versions) == expected
    else:
        # Two renames: between them the old checkpoint waits in a .old sibling; recover() (run by the next
        # write, or by hand) puts it back.
        assert target.exists() == (point == "renamed")
        recover(target)
        assert _left_is_old_or_new(target, versions) == ("B" if point == "renamed" else "A")
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.model_type == "slicegpt"
    # The next write cleans up every stale temporary and moved-aside sibling.
    write_checkpoint(target, lambda tmp: _copy_all(checkpoints["A"], tmp), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ready"]


def _copy_all(source: Path, tmp: Path) -> None:
    for path in source.iterdir():
        (tmp / path.name).write_bytes(path.read_bytes())


def test_killed_after_random_delays_never_leaves_a_broken_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    versions = {name: _digest(path) for name, path in checkpoints.items()}
    target = tmp_path / "out"
    rng = random.Random(0)
    seen = []
    for attempt in range(12):
        ready = tmp_path / f"ready{attempt}"
        child = _start(CHILD, IO_PATH, "loop", target, ready, checkpoints["A"], checkpoints["B"])
        # Kill just after the first (A) or the second (B) write completed, plus a random delay that may land in
        # the next write: a complete A or B must be left either way.
        writes = 1 + attempt % 2
        _wait_for(ready, child, timeout=60)
        while int(ready.read_text()) < writes:
            _wait_for(ready, child, timeout=60)
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.02))
        _kill(child)
        seen.append(_left_is_old_or_new(target, versions))
    # Each run overwrote the last one's result, and kills after the A and after the B write both left their
    # version at least once: if an overwrite were lost or the swap never happened, one would be missing.
    assert set(seen) == {"A", "B"}, seen
    AutoModelForCausalLM.from_pretrained(target)


@pytest.mark.slow  # a child importing transformers: ~5 s idle, minutes on a loaded machine
def test_killed_during_real_save_pretrained(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    versions = {name: _digest(path) for name, path in checkpoints.items()}
    target = tmp_path / "out"
    write_checkpoint(target, lambda tmp: _copy_all(checkpoints["A"], tmp))
    ready = tmp_path / "ready"
    child = _start(SAVE_CHILD, target, ready, checkpoints["B"], env={"HF_HUB_OFFLINE": "1"})
    _wait_for(ready, child, timeout=300)
    time.sleep(random.Random(1).uniform(0.05, 0.3))
    _kill(child)
    left = _digest(target)
    # save_pretrained rewrites B's files (config, weights, remote code, tokenizer) with the same bytes.
    weights = {name: digest["model.safetensors"] for name, digest in versions.items()}
    assert left["model.safetensors"] in weights.values()
    assert set(left) >= {"config.json", "model.safetensors", "modeling_sliced.py", "tokenizer.json"}
    AutoModelForCausalLM.from_pretrained(target)


def test_every_checkpoint_write_in_the_package_is_atomic() -> None:
    """Each ``save_pretrained``/``save_file`` call sits in a function handed to ``write_checkpoint``.

    Allowed otherwise: the GGUF cache in loading.py and resume state files, which write into a fresh
    temporary directory or file themselves and rename it into place, streaming.py's staging directory
    (filled by ``_publish`` and the ``extra_files`` callback of ``hf-slicegpt slice --low-memory``), which is
    published by one rename when complete, and the sliced model's own ``save_pretrained`` override (it
    delegates to transformers' and adds the card; its callers are the write sites checked here).
    """
    allowed = {
        ("modeling_sliced.py", "save_pretrained"),
        ("loading.py", "_load_gguf"),
        ("resume.py", "save_tensors"),
        ("streaming.py", "_publish"),
        ("pipeline.py", "extras"),
    }
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        handed_over = {
            arg.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "write_checkpoint"
            for arg in node.args
            if isinstance(arg, ast.Name)
        }
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                name = getattr(getattr(node, "func", None), "attr", None) or getattr(
                    getattr(node, "func", None), "id", None
                )
                if isinstance(node, ast.Call) and name in ("save_pretrained", "save_file"):
                    inner = _innermost_function(func, node)
                    if inner.name not in handed_over and (path.name, inner.name) not in allowed:
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} in {inner.name}()")
    assert not offenders, (
        f"checkpoint writes outside hf_slicegpt.checkpoint.io.write_checkpoint: {sorted(set(offenders))}"
    )


def _innermost_function(func: ast.AST, target: ast.AST) -> ast.FunctionDef:
    for child in ast.walk(func):
        nested = child is not func and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        if nested and any(node is target for node in ast.walk(child)):
            return _innermost_function(child, target)
    return func  # type: ignore[return-value]
