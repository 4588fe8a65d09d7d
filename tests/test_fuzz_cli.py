"""Fuzzing the CLI arguments and the sliced ``config.json``: every failure is a clean error, never a hang.

- ``config.json`` fields (top level, the family sub-config, single list entries, deletions) get random JSON
  values, in-process: ``validate_checkpoint`` passes or raises a ``ValueError``; when it passes,
  ``from_pretrained`` and a forward pass succeed or raise a ``ValueError``; ``hf-slicegpt info`` exits 0 or 1
  with one error line.
- CLI argument lists are drawn from each sub-command's flags and a pool of hostile values, and run through
  ``hf_slicegpt.cli.main`` in-process: it returns 0 or 1 (or argparse exits 2), prints at most one error line and
  no traceback, and leaves no half-written output.
- A few real subprocesses check the console entry point itself.

Every run is under a SIGALRM deadline, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt import cli
from hf_slicegpt.checkpoint.validation import validate_checkpoint

TEXT = "\n\n".join(topics[k] for k in sorted(topics))[-20_000:]
DEADLINE_S = 300  # generous: the shared CI machine can be slow; a real hang never ends


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    sliced = hf_slicegpt.slice_model(
        make_tiny("llama_tied"), calibration(), 0.25, round_to=4, show_progress=False
    )
    sliced.save_pretrained(root / "sliced")
    char_tokenizer().save_pretrained(root / "sliced")
    make_tiny("llama").save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / "afile").write_text("not a model", encoding="utf-8")
    (root / "emptydir").mkdir()
    (root / "fuzzed").mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "sliced" / name, root / "fuzzed" / name)
    return {"root": root}


# ------------------------------------------------------------------------------------------ config.json

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.sampled_from([0, -1, 1, 7, 24, 32, 33, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["transformers.models.llama.modeling_llama.LlamaMLP", "os.system", "parallel", "silu"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _config_mutation(base: dict[str, Any]) -> st.SearchStrategy[tuple[str, str, Any]]:
    family_keys = sorted(base["family_config"])
    list_keys = sorted(k for k, v in base.items() if isinstance(v, list))
    return st.one_of(
        st.tuples(st.just("set"), st.sampled_from(sorted(base)), JSON_VALUES),
        st.tuples(st.just("delete"), st.sampled_from(sorted(base)), st.none()),
        st.tuples(st.just("family"), st.sampled_from(family_keys), JSON_VALUES),
        st.tuples(st.just("entry"), st.sampled_from(list_keys), st.one_of(st.integers(-3, 40), JSON_SCALARS)),
    )


def _mutate(base: dict[str, Any], how: str, key: str, value: Any) -> dict[str, Any]:
    config = json.loads(json.dumps(base))
    if how == "set":
        config[key] = value
    elif how == "delete":
        del config[key]
    elif how == "family":
        config["family_config"][key] = value
    elif config[key]:
        config[key][len(config[key]) // 2] = value
    return config


def _check_config_error(err: ValueError, directory: Path, how: str, key: str) -> None:
    """The message says where (the checkpoint or its config.json) and, when it names a field, the right one."""
    message = str(err)
    assert str(directory) in message, message
    if how != "delete" and ("SlicedConfig." in message or "Validation error for field" in message):
        assert key in message, (key, message)


@given(data=st.data())
def test_fuzzed_config_json_fails_cleanly(work: dict[str, Path], data: st.DataObject) -> None:
    root = work["root"]
    base = json.loads((root / "sliced" / "config.json").read_text())
    mutation = data.draw(_config_mutation(base), label="mutation")
    directory = root / "fuzzed"
    (directory / "config.json").write_text(json.dumps(_mutate(base, *mutation)))
    with deadline(DEADLINE_S):
        try:
            validate_checkpoint(directory)
        except ValueError as err:
            _check_config_error(err, directory, mutation[0], mutation[1])
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(directory)
                model(torch.tensor([[1, 2, 3]]))
            except ValueError as err:
                _check_config_error(err, directory, mutation[0], mutation[1])
        # The CLI reads the same file: exit 0 or one error line.
        code = cli.main(["info", str(directory), "-q"])
    assert code in (0, 1)


def test_fuzzed_config_stderr_is_one_line(work: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    directory = work["root"] / "fuzzed"
    base = json.loads((work["root"] / "sliced" / "config.json").read_text())
    for mutation in [
        ("set", "attn_input_dims", "x"),
        ("family", "num_hidden_layers", -1),
        ("delete", "family_config", None),
    ]:
        (directory / "config.json").write_text(json.dumps(_mutate(base, *mutation)))
        assert cli.main(["info", str(directory)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1, err


# ------------------------------------------------------------------------------------------ CLI arguments

NUMBERS = ["0", "1", "-1", "0.25", "25", "0.999", "1e309", "nan", "inf", "-0", "3.5", "99999999999", "", "x"]


def _values(root: Path) -> dict[str, st.SearchStrategy[str]]:
    paths = [
        root / "dense",
        root / "sliced",
        root / "nope",
        root / "afile",
        root / "emptydir",
        root / "corpus.txt",
    ]
    path = st.sampled_from([str(p) for p in paths])
    source = st.sampled_from([str(root / "corpus.txt"), str(root / "empty.txt"), "pydocs", str(root / "nope.txt"),
                              str(root / "emptydir"), str(root / "afile")])  # fmt: skip
    number = st.sampled_from(NUMBERS)
    return {
        "model": path,
        "--sparsity": number,
        "--output": st.sampled_from(
            [str(root / "out"), str(root / "sliced"), str(root / "afile"), str(root)]
        ),
        "--calibration": source,
        "--data": source,
        "--eval-data": source,
        "--num-samples": st.sampled_from(["1", "2", "0", "-3", "x", "100000"]),
        "--seq-len": st.sampled_from(["1", "2", "16", "0", "1000000", "x"]),
        "--seed": number,
        "--batch-size": st.sampled_from(["1", "3", "0", "-1", "x"]),
        "--round-to": st.sampled_from(["1", "4", "64", "0", "-8", "x"]),
        "--dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8", ""]),
        "--device": st.sampled_from(["cpu", "cuda", "meta", "xyz"]),
        "--rotation": st.sampled_from(["layer", "global", "x"]),
        "--schedule": st.sampled_from(["const", "variance", "x"]),
        "--max-tokens": st.sampled_from(["16", "1", "0", "x"]),
        "--prompt": st.text(max_size=12),
        "--max-new-tokens": st.sampled_from(["1", "4", "0", "-2", "x"]),
        "--temperature": number,
        "--top-p": number,
        "--repetition-penalty": number,
    }


COMMANDS = {
    "slice": ["--sparsity", "--output", "--calibration", "--num-samples", "--seq-len", "--seed", "--batch-size",
              "--round-to", "--dtype", "--device", "--rotation", "--schedule", "--eval-data", "--overwrite"],
    "eval": ["--data", "--seq-len", "--max-tokens", "--batch-size", "--dtype", "--device", "--json"],
    "generate": ["--prompt", "--max-new-tokens", "--temperature", "--top-p", "--repetition-penalty", "--seed",
                 "--dtype", "--device"],
    "info": ["--json"],
}  # fmt: skip
# Sensible defaults so that most drawn runs get past argparse into the code under test, cheaply.
DEFAULTS = {
    "slice": ["--sparsity", "0.25", "--output", "OUT", "--calibration", "CORPUS", "--num-samples", "2",
              "--seq-len", "16", "--device", "cpu"],
    "eval": ["--data", "CORPUS", "--seq-len", "16", "--max-tokens", "64", "--device", "cpu"],
    "generate": ["--prompt", "def f(", "--max-new-tokens", "4", "--device", "cpu"],
    "info": [],
}  # fmt: skip


@st.composite
def argv_lists(draw: st.DrawFn, root: Path) -> list[str]:
    values = _values(root)
    command = draw(st.sampled_from(sorted(COMMANDS)))
    argv = [command, draw(values["model"])]
    defaults = [
        {"OUT": str(root / "out"), "CORPUS": str(root / "corpus.txt")}.get(a, a) for a in DEFAULTS[command]
    ]
    if draw(st.booleans()):
        argv += defaults
    for flag in draw(st.lists(st.sampled_from(COMMANDS[command]), max_size=4)):
        argv += [flag] if flag in ("--overwrite", "--json") else [flag, draw(values[flag])]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.text(max_size=6)))
    return argv


@pytest.fixture(scope="module")
def root(work: dict[str, Path]) -> Path:
    return work["root"]


@given(data=st.data())
def test_fuzzed_cli_arguments_fail_cleanly(
    root: Path, data: st.DataObject, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = data.draw(argv_lists(root), label="argv")
    shutil.rmtree(root / "out", ignore_errors=True)
    weights = (root / "sliced" / "model.safetensors").read_bytes()
    with deadline(DEADLINE_S):
        try:
            code = cli.main(["-q", *argv])
        except SystemExit as exit_:  # argparse: usage errors (2), --help (0)
            code = exit_.code
    _, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 1:
        errors = [line for line in err.splitlines() if line.startswith("hf-slicegpt: error:")]
        assert len(errors) == 1, (argv, err)
        # The message names what was wrong: one of the given flags, values or paths.
        given_words = {a.strip().lstrip("-") for a in argv if len(a.strip().lstrip("-")) >= 2} - {"q"}
        assert any(word in errors[0] for word in given_words), (argv, errors[0])
    if code != 0 and argv[0] == "slice":
        assert not (root / "out").exists(), argv  # a failed slice leaves no directory
    assert not list(root.glob(".*.tmp")), argv  # and no temporary sibling
    # A refused --overwrite of the good checkpoint never damages it.
    if code != 0:
        assert (root / "sliced" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["slice", "NOPE", "--sparsity", "25", "-o", "OUT"], 1, "looks like a percentage"),
        (["eval", "SLICED_BAD", "--data", "CORPUS", "--seq-len", "16"], 1, "does not match its config.json"),
        (["eval", "DENSE", "--data", "CORPUS", "--seq-len", "zero"], 2, "expected an integer, got 'zero'"),
    ],
)
def test_console_entry_point_errors(
    root: Path, tmp_path: Path, argv: list[str], code: int, needle: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(root / "sliced", bad)
    config = json.loads((bad / "config.json").read_text())
    config["head_input_dim"] = 16
    (bad / "config.json").write_text(json.dumps(config))
    names = {"NOPE": tmp_path / "nope", "OUT": tmp_path / "out", "SLICED_BAD": bad, "DENSE": root / "dense",
             "CORPUS": root / "corpus.txt"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "hf_slicegpt.cli", *[str(names.get(a, a)) for a in argv]],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HOME": str(tmp_path),
        },
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
