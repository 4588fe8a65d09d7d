"""Issue 15: never delete what is not ours, never run code from a checkpoint, never publish a broken one.

Every finding of the adversarial trial has a test here. Those for data loss and code execution were run
against the code before the fix and failed there (see the issue's closing note).
"""

from __future__ import annotations

import builtins
import json
import math
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import save_tiny_checkpoint, single_thread, write_corpus
from safetensors.torch import load_file, save_file
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer

import hf_slicegpt

# Names new with this issue are looked up when a test runs, so each test can be run against the older code.
from hf_slicegpt import cli
from hf_slicegpt.checkpoint import io, validation
from hf_slicegpt.checkpoint.hub import PushError, build_model_card, push
from hf_slicegpt.checkpoint.io import OutputExistsError, check_output_dir, write_checkpoint
from hf_slicegpt.checkpoint.validation import NonFiniteWeightsError, check_finite_weights
from hf_slicegpt.slicing import SlicingError
from hf_slicegpt.workflows import data, zeroshot
from hf_slicegpt.workflows.loading import ModelSourceError, load_model_and_tokenizer

SEQ = ["--num-samples", "8", "--seq-len", "32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    return {
        "root": root,
        "dense": save_tiny_checkpoint(root / "dense"),
        "corpus": write_corpus(root / "corpus.txt"),
    }


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, valid sliced checkpoint (with a tokenizer and a report) to copy and damage."""
    with single_thread():
        model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, show_progress=False)
    directory = tmp_path_factory.mktemp("sliced") / "sliced"
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    (directory / "slicing_report.json").write_text(json.dumps({"model": "tiny"}))
    return directory


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def _offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_SLICEGPT_CACHE", str(tmp_path / "cache"))


def run_main(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the model is loaded: the check under test must come before any slow work."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("hf_slicegpt.workflows.loading.load_model_and_tokenizer", refuse)


# ------------------------------------------------------------------------------------------ data loss


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    userdata = tmp_path / "userdata"
    userdata.mkdir()
    (userdata / "thesis.txt").write_text("precious")
    code, _, err = run_main(
        capsys, "slice", work["dense"], "--sparsity", "0.25", "--calibration", work["corpus"], *SEQ,
        "-o", userdata, "--overwrite", "-q",
    )  # fmt: skip
    assert code == 1 and (userdata / "thesis.txt").read_text() == "precious"
    assert "replaces only an empty directory or a checkpoint hf-slicegpt wrote" in err
    assert len(err.strip().splitlines()) == 1 and "thesis.txt" in err


def test_overwrite_refuses_the_current_directory(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("precious")
    monkeypatch.chdir(here)
    code, _, err = run_main(
        capsys, "slice", work["dense"], "--sparsity", "0.25", "--calibration", work["corpus"], *SEQ,
        "-o", ".", "--overwrite", "-q",
    )  # fmt: skip
    assert code == 1 and (here / "notes.txt").read_text() == "precious"
    assert "current directory" in err and len(err.strip().splitlines()) == 1
    # A directory above the current one would delete it too.
    with pytest.raises(OutputExistsError, match="current directory"):
        check_output_dir(tmp_path, overwrite=True)


def test_overwrite_refuses_the_input_model_and_its_parent(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "parent"
    model = _copy(work["dense"], parent / "model")
    code, _, err = run_main(
        capsys, "slice", model, "--sparsity", "0.25", "--calibration", work["corpus"], *SEQ,
        "-o", parent, "--overwrite", "-q",
    )  # fmt: skip
    assert code == 1 and "input model" in err and len(err.strip().splitlines()) == 1
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()


def test_the_input_rule_holds_even_for_our_own_checkpoints(sliced: Path, tmp_path: Path) -> None:
    """A sliced checkpoint is ours, yet writing an RFT result over its own input must still be refused."""
    source = _copy(sliced, tmp_path / "sliced")
    for output in (source, tmp_path):
        with pytest.raises(OutputExistsError, match="input model"):
            check_output_dir(output, overwrite=True, inputs=[source])
    assert (source / "model.safetensors").is_file()


def test_an_output_below_a_regular_file_fails_before_loading(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file.txt").write_text("x")
    _no_loading(monkeypatch)
    code, _, err = run_main(
        capsys, "slice", work["dense"], "--sparsity", "0.25", "--calibration", work["corpus"], *SEQ,
        "-o", tmp_path / "file.txt" / "out", "-q",
    )  # fmt: skip
    assert code == 1 and "is a file, not a directory" in err


def test_long_output_names_within_the_limit_work_and_longer_ones_fail_first(tmp_path: Path) -> None:
    """A legal 245-byte name once failed with [Errno 36] after the whole run: the temporary suffix was too long."""
    target = tmp_path / ("n" * 245)
    write_checkpoint(target, lambda d: (d / "slicing_report.json").write_text("{}"))
    assert (target / "slicing_report.json").is_file()
    write_checkpoint(target, lambda d: (d / "slicing_report.json").write_text("{}"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    with pytest.raises(io.OutputPathError, match="256 bytes, over the file-system limit of 255"):
        check_output_dir(tmp_path / ("n" * 256), overwrite=False)


def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_run(tmp_path: Path) -> None:
    target = tmp_path / "out"
    stale = tmp_path / ".out.99999999-abcd.tmp"  # a pid above any pid_max: its writer is gone
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1024)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.txt").write_text("precious")
    swapped = tmp_path / ".out.lnk.tmp"  # a symlink an exchange swapped out
    swapped.symlink_to(keep)
    live = tmp_path / f".out.{os.getppid()}-live.tmp"  # a write in flight in another process
    live.mkdir()
    check_output_dir(target, overwrite=False)  # the start of the next run, before any slow work
    assert not stale.exists() and not os.path.lexists(swapped)
    assert live.is_dir() and (keep / "data.txt").read_text() == "precious"


def test_overwriting_a_symlink_leaves_no_link_behind(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "slicing_report.json").write_text('{"v": "old"}')
    link = tmp_path / "link"
    link.symlink_to(real)
    write_checkpoint(link, lambda d: (d / "slicing_report.json").write_text('{"v": "new"}'), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert json.loads((link / "slicing_report.json").read_text()) == {"v": "new"}
    assert json.loads((real / "slicing_report.json").read_text()) == {
        "v": "old"
    }  # the link target is untouched


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_directories_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        target = write_checkpoint(tmp_path / "out", lambda d: (d / "slicing_report.json").write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_native_exports_and_reports_mark_our_checkpoints(tmp_path: Path) -> None:
    model = hf_slicegpt.slice_model(
        make_tiny("llama"), calibration(), 0.25, rotation="global", show_progress=False
    )
    foreign = tmp_path / "foreign"  # a model of someone else's, not a checkpoint hf-slicegpt wrote
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (foreign / "train.py").write_text("# precious")
    with pytest.raises(OutputExistsError, match="replaces only"):
        hf_slicegpt.save_native(model, foreign, overwrite=True)
    assert (foreign / "train.py").is_file() and not io.is_own_checkpoint(foreign)
    target = hf_slicegpt.save_native(model, tmp_path / "native")
    assert not (target / "slicing_report.json").exists() and io.is_own_checkpoint(target)
    hf_slicegpt.save_native(model, target, overwrite=True)  # replacing our own export is allowed


# ---------------------------------------------------------------------------------- code execution


def _plant_tokenizer_code(directory: Path, marker: Path) -> None:
    """A tokenizer_config.json whose auto_map points at code that leaves ``marker`` when it runs."""
    (directory / "evil_tok.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    config_path.write_text(json.dumps(config))


def test_a_tokenizer_auto_map_never_runs_nor_prompts(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _copy(work["dense"], tmp_path / "planted")
    marker = tmp_path / "code-ran"
    _plant_tokenizer_code(source, marker)
    asked: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")  # a user typing y
    with pytest.raises(ValueError) as refused:  # noqa: PT011 - the code must not run, whatever happens next
        try:
            load_model_and_tokenizer(source)
        finally:
            assert not marker.exists() and asked == []  # nothing ran, nothing was asked on stdout
    assert isinstance(refused.value, ModelSourceError) and "--trust-remote-code" in str(refused.value)


def test_info_names_an_auto_map_that_is_not_ours(
    sliced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _copy(sliced, tmp_path / "sliced")
    _plant_tokenizer_code(directory, tmp_path / "code-ran")
    code, out, _ = run_main(capsys, "info", directory)
    assert code == 0 and "tokenizer_config.json" in out and "evil_tok.EvilTokenizer" in out
    code, out, _ = run_main(capsys, "info", directory, "--json")
    warnings = json.loads(out)["warnings"]
    assert any("evil_tok.EvilTokenizer" in w for w in warnings) and not (tmp_path / "code-ran").exists()


def test_zero_shot_never_trusts_remote_code_by_default(sliced: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    import lm_eval.models.huggingface as huggingface

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_hflm(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(huggingface, "HFLM", fake_hflm)
    with pytest.raises(Stop):
        zeroshot.evaluate_tasks(str(sliced), tasks="piqa", device="cpu")
    assert seen["trust_remote_code"] is False


# ---------------------------------------------------------------------------------------- publishing


def _dry_push(directory: Path, **kwargs: Any) -> Any:
    return push(directory, "org/tiny-sliced", dry_run=True, **kwargs)


def test_push_refuses_pickles_and_foreign_code_unless_named(sliced: Path, tmp_path: Path) -> None:
    evil = _copy(sliced, tmp_path / "evil")
    (evil / "evil.py").write_text("import os\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.Model"
    (evil / "config.json").write_text(json.dumps(config))
    with pytest.raises(PushError, match=r"evil\.py.*--allow-file"):
        _dry_push(evil)
    plan = _dry_push(evil, allow_files=["evil.py"])
    assert "evil.py" in plan.files and any("evil.Model" in w for w in plan.warnings)

    modified = _copy(sliced, tmp_path / "modified")
    with (modified / "modeling_sliced.py").open("a") as handle:
        handle.write("\nimport os  # planted\n")
    with pytest.raises(PushError, match="modeling_sliced.py"):
        _dry_push(modified)

    pickled = _copy(sliced, tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PushError, match="pytorch_model.bin"):
        _dry_push(pickled)
    plan = _dry_push(_copy(sliced, tmp_path / "clean"))
    assert {"model.safetensors", "modeling_sliced.py", "configuration_sliced.py"} <= set(plan.files)


@pytest.mark.parametrize("damage", ["shortcut_flags", "widths"])
def test_push_validates_as_info_does(
    sliced: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _copy(sliced, tmp_path / damage)
    config = json.loads((directory / "config.json").read_text())
    if damage == "shortcut_flags":
        config["attn_shortcuts"] = [not flag for flag in config["attn_shortcuts"]]
    else:
        config["attn_input_dims"] = [10**6] * len(config["attn_input_dims"])
    (directory / "config.json").write_text(json.dumps(config))
    code, _, info_err = run_main(capsys, "info", directory)
    assert code == 1
    with pytest.raises(ValueError) as refused:
        _dry_push(directory)
    assert " ".join(str(refused.value).split()) in info_err  # the same one-line reason as `info`
    code, _, err = run_main(capsys, "push", directory, "--repo-id", "org/x", "--dry-run")
    assert code == 1 and err == info_err


# ------------------------------------------------------------------------------------------- smaller


def test_achieved_sparsity_is_recorded_and_a_clamped_width_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from hf_slicegpt.checkpoint import report as reporting
    from hf_slicegpt.cli.info import format_info

    with caplog.at_level("WARNING", logger="hf_slicegpt"):
        model = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.999, show_progress=False)
    # hidden 32, round_to 8: the width never goes below 8, so 75% is removed, not 99.9%
    assert model.config.slicing["sparsity"] == 0.999
    assert model.config.slicing["achieved_sparsity"] == 0.75
    assert "Asked for sparsity 0.999 but 0.75" in caplog.text
    report = reporting.build_report(model, model="tiny", settings={}, dense_parameters=1, seconds={})
    assert report["slicing"]["achieved_sparsity"] == 0.75
    directory = tmp_path / "sliced"
    model.save_pretrained(directory)
    reporting.write_report(report, directory)
    assert json.loads((directory / "config.json").read_text())["slicing"]["achieved_sparsity"] == 0.75
    summary = reporting.checkpoint_summary(directory)
    assert summary["slicing"]["achieved_sparsity"] == 0.75
    assert "99.9%, 75% achieved" in format_info(summary)
    text = build_model_card(directory).text
    assert "| sparsity | 99.9% |" in text and "| sparsity achieved (from the widths) | 75% |" in text
    assert "75% of the hidden size removed" in text

    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_slicegpt"):
        exact = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, show_progress=False)
    assert exact.config.slicing["achieved_sparsity"] == 0.25 and "Asked for sparsity" not in caplog.text


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_are_refused_by_name(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = tmp_path / "dense"
    make_tiny("llama").save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = (tensors[name] * 100).to(dtype)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} is stored as (I32|BOOL)") as refused:
        load_model_and_tokenizer(directory)
    assert isinstance(refused.value, validation.WeightDtypeError)


def test_integer_weights_in_a_sliced_checkpoint_are_refused_by_validation(
    sliced: Path, tmp_path: Path
) -> None:
    from hf_slicegpt.checkpoint.validation import validate_checkpoint

    directory = _copy(sliced, tmp_path / "sliced")
    tensors = load_file(directory / "model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name} is stored as I32") as refused:
        validate_checkpoint(directory)
    assert isinstance(refused.value, validation.WeightDtypeError)


def test_nan_weights_error_names_the_tensor_without_wrong_advice() -> None:
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteWeightsError) as error:
        check_finite_weights(model)
    message = str(error.value)
    assert "model.layers.1.mlp.down_proj.weight" in message and "torch.float32" in message
    assert "--dtype float32" not in message
    with pytest.raises(
        NonFiniteWeightsError, match="--dtype float32"
    ):  # float16 can overflow: advice applies
        check_finite_weights(model.half())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "1", "--top-p", "2"], "--top-p must be in (0, 1]"),
        (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "1", "--top-k", "-1"], "--top-k must be an integer >= 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
    ],
)
def test_generate_refuses_sampling_settings_out_of_range_before_loading(
    work: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    message: str,
) -> None:
    _no_loading(monkeypatch)
    code, _, err = run_main(capsys, "generate", work["dense"], "--prompt", "def", *flags)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_generate_caps_new_tokens_at_the_context(
    work: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    from hf_slicegpt.cli.generate import generate_text

    model, tokenizer = load_model_and_tokenizer(work["dense"])
    model.generation_config.eos_token_id = None  # never stop early: the cap must be what ends it
    limit = model.config.max_position_embeddings
    prompt_tokens = len(tokenizer("def f():")["input_ids"])
    generate, asked = model.generate, []

    def spy(**kwargs: Any) -> Any:
        asked.append(kwargs["max_new_tokens"])
        output = generate(**kwargs)
        asked.append(output.shape[1])
        return output

    model.generate = spy
    with caplog.at_level("WARNING", logger="hf_slicegpt"):
        generate_text(model, tokenizer, "def f():", max_new_tokens=10**6, temperature=1.0, top_k=5)
    assert f"would run past the model's context of {limit} tokens" in caplog.text
    assert asked == [limit - prompt_tokens, limit]


def test_a_fifo_as_calibration_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)

    def unblock() -> None:  # the old code blocked reading the FIFO: give it an EOF rather than hang the suite
        time.sleep(3)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # nobody is reading: the refusal came first
        os.close(fd)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    with pytest.raises(data.DataSourceError, match="neither a regular file nor a directory"):
        data.load_text(str(fifo), purpose="calibration")
    thread.join()


@pytest.mark.parametrize(
    ("model", "device", "message"),
    [
        (torch.nn.Linear(4, 4), None, "must be a transformers causal LM.*got Linear"),
        (None, None, "must be a transformers causal LM.*got NoneType"),
        ("tiny", "nosuchdevice", "unknown device 'nosuchdevice'"),
    ],
)
def test_slice_model_names_bad_api_input(model: Any, device: Any, message: str) -> None:
    model = make_tiny("llama") if model == "tiny" else model
    with pytest.raises(SlicingError, match=message):
        hf_slicegpt.slice_model(model, calibration(), 0.25, device=device, show_progress=False)


def test_io_names_are_stable_for_short_outputs(tmp_path: Path) -> None:
    """Short names keep the old temporary naming, so a resumable ``.NAME.partial`` from before still matches."""
    assert io.temp_stem(tmp_path / "out") == ".out"
    assert len(io.temp_stem(tmp_path / ("n" * 250))) < 40


def test_push_allow_file_flag_names_a_file_to_upload(sliced: Path, tmp_path: Path, capsys) -> None:
    extra = _copy(sliced, tmp_path / "extra")
    (extra / "helper.py").write_text("VALUE = 1\n")
    code, _, err = run_main(capsys, "push", extra, "--repo-id", "org/x", "--dry-run")
    assert code != 0 and "helper.py" in err and "--allow-file" in err
    code, out, err = run_main(
        capsys, "push", extra, "--repo-id", "org/x", "--dry-run", "--allow-file", "helper.py"
    )
    assert code == 0, err
    assert "helper.py" in out


@pytest.mark.parametrize("command", ["eval", "rft"])
def test_trust_remote_code_flag_reaches_the_loader(
    command: str, sliced: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Off unless asked: the flag (and only the flag) makes the loader trust the checkpoint's code."""
    from hf_slicegpt.workflows import loading

    seen: list[bool] = []

    def loader(*args: Any, trust_remote_code: bool = False, **kwargs: Any) -> Any:
        seen.append(trust_remote_code)
        raise KeyboardInterrupt  # stop here: only the argument matters

    monkeypatch.setattr(loading, "load_model_and_tokenizer", loader)
    extra = {"eval": ["--data", "pydocs"], "rft": ["--data", "pydocs", "--output", str(tmp_path / "out")]}[
        command
    ]
    for flag in ([], ["--trust-remote-code"]):
        code, _, _ = run_main(capsys, command, sliced, *extra, "--device", "cpu", *flag)
        assert code == 130
    assert seen == [False, True]


def test_push_allow_incomplete_flag_pushes_a_checkpoint_without_tokenizer(
    sliced: Path, tmp_path: Path, capsys
) -> None:
    bare = _copy(sliced, tmp_path / "bare")
    for path in bare.glob("tokenizer*"):
        path.unlink()
    for name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
        (bare / name).unlink(missing_ok=True)
    code, _, err = run_main(capsys, "push", bare, "--repo-id", "org/x", "--dry-run")
    assert code != 0 and "no tokenizer" in err and "--allow-incomplete" in err
    code, out, err = run_main(capsys, "push", bare, "--repo-id", "org/x", "--dry-run", "--allow-incomplete")
    assert code == 0, err
    assert "model.safetensors" in out
