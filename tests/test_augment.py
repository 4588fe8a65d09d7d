"""Calibration augmentation (issue: out-of-domain quality): parsing, vocabulary swaps and the CLI paths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_slicegpt.workflows.augment import Augmentation, AugmentError, parse_augment, swapped_tokens


def test_parse_augment_reads_both_kinds_and_names_bad_specs() -> None:
    assert parse_augment(None) == Augmentation() and not parse_augment("none")
    assert parse_augment("self:16") == Augmentation(self_samples=16)
    assert parse_augment("swap:0.3") == Augmentation(swap_fraction=0.3)
    assert parse_augment("self:4, swap:1") == Augmentation(4, 1.0)
    for bad in ("mirror:3", "swap:0", "swap:1.5", "self:0", "self:2,self:3", "swap:0.1.2", "self:-1"):
        with pytest.raises(AugmentError, match="swap:F") as info:
            parse_augment(bad)
        assert repr(bad) in str(info.value)


def _windows() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 40, (6, 64), generator=generator)


def test_swapped_tokens_keep_each_windows_repetitions() -> None:
    tokens = _windows()
    protected = {0, 1, 2}
    out = swapped_tokens(tokens, 0.5, 1000, protected=protected, seed=3)
    assert out.shape == tokens.shape and out.dtype == torch.long
    assert torch.equal(out, swapped_tokens(tokens, 0.5, 1000, protected=protected, seed=3))
    assert not torch.equal(out, swapped_tokens(tokens, 0.5, 1000, protected=protected, seed=4))
    changed_types = total_types = 0
    for row, new in zip(tokens, out):
        for token in row.unique().tolist():
            images = new[row == token].unique()
            assert images.numel() == 1, "one token must map to one replacement in a window"
            if token in protected:
                assert images.item() == token
            else:
                total_types += 1
                changed_types += int(images.item() != token)
        assert not set(new[row != new].tolist()) & protected, "special tokens are never drawn"
    assert 0.3 < changed_types / total_types < 0.7
    # the replacements spread over the vocabulary, far beyond the 40 ids the windows use
    assert int(out.max()) >= 100


def test_swapped_tokens_refuse_bad_input() -> None:
    with pytest.raises(AugmentError, match="fraction"):
        swapped_tokens(_windows(), 0.0, 1000)
    with pytest.raises(AugmentError, match=r"\[0, 30\)"):
        swapped_tokens(_windows(), 0.5, 30)
    with pytest.raises(AugmentError, match="shape"):
        swapped_tokens(torch.arange(5), 0.5, 1000)
    with pytest.raises(AugmentError, match="too few"):
        swapped_tokens(torch.zeros(1, 4, dtype=torch.long), 0.5, 2, protected={0, 1})


def _tensors(directory) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def test_cli_swap_augmentation_changes_the_basis_the_same_way_in_both_paths(tmp_path, capsys) -> None:
    """`--calibration-augment swap:F` slices differently from plain, identically with and without --low-memory."""
    from cli_helpers import save_tiny_checkpoint, write_corpus

    from hf_slicegpt.cli import main

    dense = save_tiny_checkpoint(tmp_path / "dense", num_hidden_layers=2)
    corpus = write_corpus(tmp_path / "corpus.txt")
    common = ["slice", str(dense), "--sparsity", "0.25", "--calibration", str(corpus), "--num-samples", "4"]
    common += ["--seq-len", "32", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    swap = ["--calibration-augment", "swap:0.5"]
    assert main([*common, "--output", str(tmp_path / "swap"), *swap]) == 0
    assert main([*common, "--output", str(tmp_path / "low"), "--low-memory", *swap]) == 0
    plain, swapped, low = (_tensors(tmp_path / name) for name in ("plain", "swap", "low"))
    assert any(not torch.equal(plain[k], swapped[k]) for k in plain)
    for key, value in swapped.items():
        torch.testing.assert_close(low[key], value, rtol=1e-4, atol=1e-5)
    report = json.loads((tmp_path / "swap" / "slicing_report.json").read_text())
    assert report["settings"]["calibration_augment"] == "swap:0.5"

    capsys.readouterr()
    code = main(
        [*common, "--output", str(tmp_path / "refused"), "--low-memory", "--calibration-augment", "self:2"]
    )
    assert code != 0 and "self:N" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    code = main([*common, "--output", str(tmp_path / "bad"), "--calibration-augment", "swap:2"])
    assert code != 0 and "'swap:2'" in capsys.readouterr().err


def test_cli_calibration_mix_changes_the_basis_and_names_bad_input(tmp_path, capsys) -> None:
    """`--calibration-mix SOURCE FRACTION` calibrates on both sources; a bad mix fails before loading."""
    from cli_helpers import save_tiny_checkpoint, write_corpus

    from hf_slicegpt.cli import main

    dense = save_tiny_checkpoint(tmp_path / "dense", num_hidden_layers=2)
    corpus = write_corpus(tmp_path / "corpus.txt")
    other = tmp_path / "other.txt"
    other.write_text(
        "\n\n".join(f"Clause {i}: the Licensor grants the Work {i % 7} times." for i in range(400))
    )
    common = ["slice", str(dense), "--sparsity", "0.25", "--calibration", str(corpus), "--num-samples", "8"]
    common += ["--seq-len", "32", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "plain")]) == 0
    assert main([*common, "--output", str(tmp_path / "mix"), "--calibration-mix", str(other), "0.25"]) == 0
    plain, mixed = _tensors(tmp_path / "plain"), _tensors(tmp_path / "mix")
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)
    report = json.loads((tmp_path / "mix" / "slicing_report.json").read_text())
    assert report["settings"]["calibration_mix"] == [[str(other), 0.25]]
    assert f"mixed in       {other} (0.25)" in capsys.readouterr().out

    capsys.readouterr()
    for fraction, message in (("abc", "'abc'"), ("1.0", "must be in (0, 1)")):
        code = main([*common, "--output", str(tmp_path / "bad"), "--calibration-mix", str(other), fraction])
        err = capsys.readouterr().err
        assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    code = main(
        [*common, "--output", str(tmp_path / "bad"), "--calibration-mix", str(tmp_path / "nope.txt"), "0.1"]
    )
    assert code != 0 and "nope.txt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
