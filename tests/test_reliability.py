"""Reliability and safety: clear errors for bad checkpoints and inputs, no code from data, numerical faults.

Each defect is made on a copy of one tiny sliced checkpoint and must fail as one ``ValueError`` that names the
file or tensor and the fix: through ``validate_checkpoint``, ``AutoModelForCausalLM.from_pretrained`` and the
CLI (one line on stderr, exit status 1, no traceback, nothing written).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import math
import pickle
import re
import shutil
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt import cli
from hf_slicegpt.checkpoint import validation
from hf_slicegpt.checkpoint.validation import (
    OWN_AUTO_MAP,
    CheckpointValidationError,
    InvalidConfigError,
    MissingTokenizerError,
    NonFiniteWeightsError,
    SlicedCheckpointError,
    UnsafeWeightsError,
    WeightsFileError,
    validate_checkpoint,
)
from hf_slicegpt.modeling import modeling_sliced
from hf_slicegpt.slicing.pca import Covariance, NonFiniteSignalError, eigenbasis
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

PACKAGE = Path(hf_slicegpt.__file__).parent
TEXT = "\n\n".join(topics[k] for k in sorted(topics))[-20_000:]
SLICE_ARGS = ["--calibration", "CORPUS", "--num-samples", "4", "--seq-len", "32", "--device", "cpu", "-q"]


def _sliced(family: str = "llama", dtype: torch.dtype = torch.float32, **kwargs: Any):
    kwargs.setdefault("round_to", 4)
    model = make_tiny(family).to(dtype)
    return hf_slicegpt.slice_model(
        model, calibration(), kwargs.pop("sparsity", 0.25), show_progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    sliced = root / "sliced"
    _sliced().save_pretrained(sliced)
    char_tokenizer().save_pretrained(sliced)
    dense = root / "dense"
    make_tiny("llama").save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return {"root": root, "sliced": sliced, "dense": dense, "corpus": corpus}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: Path, **changes: Any) -> Path:
    path = directory / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))
    return directory


def _run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_clean_line(err: str) -> str:
    """The CLI's error contract: exactly one ``hf-slicegpt: error:`` line and no traceback."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("hf-slicegpt: error:")]
    assert len(errors) == 1, err
    return errors[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ config vs weights


@pytest.mark.parametrize(
    "changes, tensor, found, implied",
    [
        (
            {"attn_input_dims": [20, 24], "embedding_dim": 20},
            "model.embed_tokens.weight",
            [128, 24],
            [128, 20],
        ),
        ({"mlp_input_dims": [24, 16]}, "model.layers.1.self_attn.o_proj.weight", [24, 32], [16, 32]),
        ({"head_input_dim": 16}, "model.layers.1.mlp.down_proj.weight", [24, 64], [16, 64]),
    ],
)
def test_widths_that_disagree_with_the_weights_name_tensor_and_shapes(
    work: dict[str, Path], tmp_path: Path, changes: dict, tensor: str, found: list, implied: list
) -> None:
    directory = _edit_config(_copy(work["sliced"], tmp_path / "ck"), **changes)
    expected = f"{tensor} has shape {found} in the weights but the config implies {implied}"
    with pytest.raises(SlicedCheckpointError, match="does not match its config.json") as err:
        validate_checkpoint(directory)
    assert expected in str(err.value)
    # transformers alone would re-initialise these tensors randomly; the sliced class refuses by name.
    with pytest.raises(SlicedCheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(directory)
    assert expected in str(err.value)


def test_a_shortcut_flag_flipped_off_is_refused(work: dict[str, Path], tmp_path: Path) -> None:
    # Widths equal, so the config alone is valid, but the model would silently use the identity.
    directory = _edit_config(_copy(work["sliced"], tmp_path / "ck"), attn_shortcuts=[True, False])
    with pytest.raises(
        SlicedCheckpointError, match=r"model.layers.1.attn_shortcut.weight \(shape \[24, 24\]\)"
    ):
        AutoModelForCausalLM.from_pretrained(directory)


def test_after_load_check_catches_missing_tensors_from_any_source(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hub checkpoints skip the header pre-check; transformers' loading info still refuses random init."""
    directory = _copy(work["sliced"], tmp_path / "ck")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.0.mlp_shortcut.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlicedCheckpointError, match="mlp_shortcut.weight is missing from the weights"):
        validate_checkpoint(directory)
    monkeypatch.setattr(modeling_sliced, "check_checkpoint_weights", lambda *args: None)
    with pytest.raises(SlicedCheckpointError, match="model.layers.0.mlp_shortcut.weight is missing"):
        AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("width", [0, -8, 40, 24.0, True, "24", None])
def test_widths_out_of_range_or_not_integers_are_refused(
    work: dict[str, Path], tmp_path: Path, width: Any
) -> None:
    directory = _edit_config(_copy(work["sliced"], tmp_path / "ck"), head_input_dim=width)
    if width is None:  # None means "the original width" in SlicedConfig: valid config, wrong weights
        with pytest.raises(SlicedCheckpointError, match=r"implies \[32, 64\]"):
            validate_checkpoint(directory)
        return
    with pytest.raises(InvalidConfigError, match=r"head_input_dim = .* must be an integer in \[1, 32\]"):
        validate_checkpoint(directory)
    with pytest.raises(ValueError, match="head_input_dim"):
        AutoModelForCausalLM.from_pretrained(directory)


# ------------------------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_truncated_safetensors_is_refused_before_loading(
    work: dict[str, Path], tmp_path: Path, keep: int
) -> None:
    directory = _copy(work["sliced"], tmp_path / "ck")
    weights = directory / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(keep % size if keep >= 0 else size + keep)
    with pytest.raises(WeightsFileError, match="model.safetensors is truncated"):
        validate_checkpoint(directory)
    with pytest.raises(SlicedCheckpointError, match="model.safetensors in .* is truncated or damaged"):
        AutoModelForCausalLM.from_pretrained(directory)


def test_missing_weights_and_missing_shards(work: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(work["sliced"], tmp_path / "ck")
    (directory / "model.safetensors").unlink()
    with pytest.raises(WeightsFileError, match="has no weights: no model.safetensors"):
        validate_checkpoint(directory)
    with pytest.raises(SlicedCheckpointError, match="has no model.safetensors"):
        AutoModelForCausalLM.from_pretrained(directory)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        WeightsFileError, match="names the shard 'model-00001-of-00002.safetensors', which is missing"
    ):
        validate_checkpoint(directory)


def test_unreadable_config_json(work: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy(work["sliced"], tmp_path / "ck")
    (directory / "config.json").write_text('{"model_type": "slicegpt", ')
    with pytest.raises(InvalidConfigError, match="config.json is not valid JSON"):
        validate_checkpoint(directory)
    (directory / "config.json").write_text('{"model_type": "slicegpt", "family_config": 3}')
    with pytest.raises(InvalidConfigError, match="needs family_config"):
        validate_checkpoint(directory)
    (directory / "config.json").unlink()
    with pytest.raises(InvalidConfigError, match="has no config.json"):
        validate_checkpoint(directory)


def test_an_interrupted_write_says_how_to_recover(tmp_path: Path) -> None:
    (tmp_path / ".ck.1234.old").mkdir()
    with pytest.raises(
        CheckpointValidationError, match=r"interrupted write left the previous checkpoint.*recover"
    ):
        validate_checkpoint(tmp_path / "ck")


def test_missing_tokenizer_has_a_hint(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _copy(work["sliced"], tmp_path / "ck")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink(missing_ok=True)
    assert validate_checkpoint(directory).has_tokenizer is False
    with pytest.raises(MissingTokenizerError, match=r"has no tokenizer.*save_pretrained"):
        validate_checkpoint(directory, require_tokenizer=True, purpose="evaluation")
    code, _, err = _run(capsys, "eval", directory, "--data", work["corpus"], "--seq-len", "32")
    line = _one_clean_line(err)
    assert code == 1 and "has no tokenizer, which evaluation" in line and "save_pretrained" in line


# ------------------------------------------------------------------------------------------ no code from data


def test_saved_remote_code_is_byte_identical_to_the_package(work: dict[str, Path]) -> None:
    for name in ("configuration_sliced.py", "modeling_sliced.py"):
        assert filecmp.cmp(work["sliced"] / name, PACKAGE / "modeling" / name, shallow=False), name
    config = json.loads((work["sliced"] / "config.json").read_text())
    assert config["auto_map"] == OWN_AUTO_MAP
    assert validate_checkpoint(work["sliced"]).warnings == []


def test_pickle_weights_are_never_loaded(
    work: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        calls.append("unpickle")
        raise AssertionError("unpickling a checkpoint")

    for family, source in (("sliced", work["sliced"]), ("dense", work["dense"])):
        directory = _copy(source, tmp_path / family)
        torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
        with monkeypatch.context() as patch:
            patch.setattr(torch, "load", forbidden)
            patch.setattr(pickle, "load", forbidden)
            patch.setattr(pickle, "loads", forbidden)
            with pytest.raises(
                UnsafeWeightsError, match="pickle files .*pytorch_model.bin.*safetensors only"
            ):
                load_model_and_tokenizer(directory)
            if family == "sliced":
                with pytest.raises(SlicedCheckpointError, match="load only from safetensors"):
                    AutoModelForCausalLM.from_pretrained(directory)
    assert calls == []


def test_library_source_never_unpickles() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("torch.load(", "pickle.load", "import pickle", "weights_only=False"):
            assert needle not in text, f"{path.relative_to(PACKAGE)} uses {needle}"


def test_foreign_auto_map_warns_and_runs_nothing(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _copy(work["sliced"], tmp_path / "ck")
    marker = tmp_path / "code-ran"
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    auto_map = {"AutoConfig": "someone/repo--configuration_x.XConfig", "AutoModelForCausalLM": "evil.Model"}
    _edit_config(directory, auto_map=auto_map)
    with (directory / "modeling_sliced.py").open("a") as handle:
        handle.write("\nimport os  # tampered\n")

    warnings = validate_checkpoint(directory).warnings
    assert "AutoModelForCausalLM -> 'evil.Model'" in warnings[0]
    assert "someone/repo--configuration_x.XConfig" in warnings[0]
    assert "modeling_sliced.py" in warnings[1] and "differs from hf-slicegpt's own copy" in warnings[1]

    model, _ = load_model_and_tokenizer(directory)  # our own class, never the checkpoint's code
    assert type(model) is hf_slicegpt.SlicedModelForCausalLM
    code, out, err = _run(capsys, "info", directory)
    assert code == 0 and "WARNING" in err and "evil.Model" in err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ CLI errors


@pytest.mark.parametrize(
    "sparsity, message",
    [("25", "looks like a percentage.*0.25 for 25%"), ("1", "percentage|whole hidden"), ("nan", "sparsity")],
)
def test_cli_sparsity_errors(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], sparsity: str, message: str
) -> None:
    args = [a if a != "CORPUS" else work["corpus"] for a in SLICE_ARGS]
    code, _, err = _run(capsys, "slice", work["dense"], "--sparsity", sparsity, "-o", tmp_path / "out", *args)
    assert code == 1 and not (tmp_path / "out").exists()
    assert re.search(message, _one_clean_line(err)), err


def test_cli_calibration_shorter_than_seq_len(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "short.txt"
    corpus.write_text(TEXT[:500], encoding="utf-8")
    code, _, err = _run(
        capsys, "slice", work["dense"], "--sparsity", "0.25", "-o", tmp_path / "out", "--calibration", corpus,
        "--num-samples", "4", "--seq-len", "200", "--device", "cpu", "-q",
    )  # fmt: skip
    line = _one_clean_line(err)
    assert code == 1 and "not enough text" in line and "shorter seq-len" in line
    assert not (tmp_path / "out").exists()


def test_cli_damaged_checkpoint_is_one_line(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _edit_config(_copy(work["sliced"], tmp_path / "ck"), mlp_input_dims=[24, 16])
    for argv in (["eval", directory, "--data", work["corpus"], "--seq-len", "32"], ["info", directory]):
        code, _, err = _run(capsys, *argv)
        assert code == 1, argv
        assert "does not match its config.json" in _one_clean_line(err)


# ------------------------------------------------------------------------------------------ numerical faults


def _overflowing_fp16_llama():
    """A tiny LLaMA whose first MLP output exceeds the float16 range (65504) but not float32's."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e3)
        model.model.layers[0].mlp.down_proj.weight.mul_(5e5)
    return model


def test_fp16_overflow_names_the_layer_and_suggests_a_dtype() -> None:
    with pytest.raises(NonFiniteSignalError, match=r"layer 0 output holds NaN or Inf.*--dtype float32"):
        hf_slicegpt.slice_model(
            _overflowing_fp16_llama().half(), calibration(), 0.25, round_to=4, show_progress=False
        )


def test_cli_never_saves_a_non_finite_model(
    work: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "overflow"
    _overflowing_fp16_llama().save_pretrained(source)
    char_tokenizer().save_pretrained(source)
    out = _copy(work["sliced"], tmp_path / "out")  # a good checkpoint already there
    before = _sha(out / "model.safetensors")
    args = [a if a != "CORPUS" else work["corpus"] for a in SLICE_ARGS]
    code, _, err = _run(
        capsys, "slice", source, "--sparsity", "0.25", "-o", out, "--overwrite", "--dtype", "float16", *args
    )
    assert code == 1 and "--dtype float32" in _one_clean_line(err)
    assert _sha(out / "model.safetensors") == before  # the old checkpoint survives, nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "overflow"]
    # The suggested fix works: the same checkpoint slices in float32.
    code, _, err = _run(capsys, "slice", source, "--sparsity", "0.25", "-o", out, "--overwrite", *args)
    assert code == 0, err
    assert validate_checkpoint(out).sliced


def test_non_finite_weights_are_named() -> None:
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match=r"model.layers.1.self_attn.k_proj.weight .*not saved"):
        validation.check_finite_weights(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_slice_with_float64_statistics(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.dtype] = []
    original = eigenbasis

    def spy(cov: Covariance, *args: Any, **kwargs: Any):
        seen.append(cov.sum.dtype)
        values, vectors = original(cov, *args, **kwargs)
        seen.append(vectors.dtype)
        return values, vectors

    monkeypatch.setattr("hf_slicegpt.slicing.statistics.eigenbasis", spy)
    ids = calibration(2, 16, seed=7)
    reference = _sliced().eval()(ids).logits
    half = _sliced(dtype=dtype)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert seen and set(seen) == {torch.float64}
    logits = half(ids).logits.float()
    assert torch.isfinite(logits).all()
    # Same slice up to half-precision rounding: the bases come from float64 maths in both cases.
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.99


def test_zero_sparsity_in_bfloat16_is_the_dense_model() -> None:
    dense = make_tiny("llama").to(torch.bfloat16)
    ids = calibration(2, 16, seed=7)
    expected = dense(ids).logits.float()
    sliced = hf_slicegpt.slice_model(dense, calibration(), 0.0, show_progress=False)
    # bf16 keeps ~3 significant digits; the rotation adds one rounding per weight, not a slicing error.
    assert (sliced(ids).logits.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_rank_deficient_covariance_is_damped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cov = Covariance(32, name="layer 3 output")
    cov.add(torch.randn(1, 5, 32, dtype=torch.float64))  # 5 tokens for width 32: rank 5
    with caplog.at_level(logging.WARNING, logger="hf_slicegpt.slicing.pca"):
        values, vectors = eigenbasis(cov)
    assert "layer 3 output: only 5 calibration tokens for width 32" in caplog.text and "damped" in caplog.text
    assert torch.isfinite(vectors).all() and torch.isfinite(values).all()
    assert torch.allclose(vectors.T @ vectors, torch.eye(32, dtype=torch.float64), atol=1e-10)
    assert (values[5:] < 1e-8 * values[0]).all()  # the damping is removed from the reported spectrum
    with caplog.at_level(logging.WARNING, logger="hf_slicegpt.slicing.pca"):
        hf_slicegpt.slice_model(make_tiny("llama"), calibration(1, 8), 0.25, round_to=4, show_progress=False)
    assert "rank-deficient and damped" in caplog.text
