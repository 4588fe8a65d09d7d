"""The output-aware correction in the layer loop (``hf_slicegpt.slicing.refit``), through the public API.

Exact at 0% in every family and mode, deterministic, the checkpoint layout unchanged, every block's output
closer to the dense model's on text held out from calibration, resumable bit for bit, and a broken solve seen.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import FAMILIES, calibration, make_low_rank_llama, make_tiny

import hf_slicegpt
from hf_slicegpt.slicing import SlicingConfig, SlicingError, correction
from hf_slicegpt.slicing.calibration import CalibrationBatch
from hf_slicegpt.slicing.config import CORRECTION_TOKENS
from hf_slicegpt.slicing.refit import fit_step


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rotation", ["layer", "global"])
def test_correction_is_exact_at_zero_sparsity(family, rotation):
    dense = make_tiny(family)
    test = calibration(4, 16, seed=7)
    with torch.no_grad():
        expected = dense(test).logits
    sliced = hf_slicegpt.slice_model(
        copy.deepcopy(dense),
        calibration(16, 16),
        0.0,
        rotation=rotation,
        correction="ridge",
        show_progress=False,
    )
    with torch.no_grad():
        assert (sliced(test).logits - expected).abs().max() < 1e-4
    recorded = sliced.config.slicing["correction"]
    assert recorded["method"] == "ridge" and recorded["updates"] >= sliced.config.num_hidden_layers


def test_correction_is_deterministic_and_keeps_the_checkpoint_layout():
    dense = make_tiny("llama")
    runs = [
        hf_slicegpt.slice_model(
            copy.deepcopy(dense), calibration(16, 16), 0.25, correction="ridge", show_progress=False
        )
        for _ in range(2)
    ]
    plain = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration(16, 16), 0.25, correction="none", show_progress=False
    )
    first, second, reference = runs[0].state_dict(), runs[1].state_dict(), plain.state_dict()
    assert first.keys() == second.keys() == reference.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(first[k].shape == reference[k].shape for k in first)
    assert any(not torch.equal(first[k], reference[k]) for k in first)
    assert plain.config.slicing["correction"] == {"method": "none"}


def _block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [o.reshape(-1, o.shape[-1]).double() for o in outputs]


def _procrustes_error(sliced: torch.Tensor, dense: torch.Tensor) -> float:
    """Relative error of a sliced signal against the dense one under the best isometry (basis-free)."""
    weights = 1.0 / dense.pow(2).mean(-1, keepdim=True)
    u, _, vh = torch.linalg.svd((dense * weights).T @ sliced, full_matrices=False)
    basis = u @ vh
    return float((weights * (sliced - dense @ basis) ** 2).sum() / (weights * dense**2).sum())


@pytest.mark.parametrize(
    "build",
    [
        lambda: make_tiny("llama"),
        lambda: make_low_rank_llama(22, attention_rank=6),
        lambda: make_tiny("phi"),
    ],
    ids=["llama", "low-rank-llama", "phi-parallel"],
)
@pytest.mark.parametrize("shortcuts,gain", [(False, 0.95), (True, 0.9)], ids=["writers", "writers+shortcuts"])
def test_correction_lowers_every_block_error_on_held_out_text(build, shortcuts: bool, gain: float):
    """Each block's output error on held-out text falls, and in sum by at least ``1 - gain``; refitting the
    shortcuts too (more parameters) removes more on these random models."""
    dense = build()
    held_out = calibration(16, 32, seed=7)
    reference = _block_outputs(dense, held_out)
    errors = {}
    for mode in ("none", "ridge"):
        options = {} if mode == "none" else {"correction_fraction": 1.0, "correction_shortcuts": shortcuts}
        sliced = hf_slicegpt.slice_model(
            copy.deepcopy(dense), calibration(64, 32), 0.25, correction=mode, show_progress=False, **options
        )
        errors[mode] = [_procrustes_error(s, d) for s, d in zip(_block_outputs(sliced, held_out), reference)]
    # A block with nothing to correct (the low-rank model's first: the slice loses nothing) stays as it was.
    for plain, corrected in zip(errors["none"], errors["ridge"]):
        assert corrected <= plain * (1 + 1e-4)
    assert sum(errors["ridge"]) < gain * sum(errors["none"])


def _logit_error(dense, calib, test, **options) -> float:
    with torch.no_grad():
        expected = dense(test).logits
        sliced = hf_slicegpt.slice_model(copy.deepcopy(dense), calib, show_progress=False, **options)
        return float(((sliced(test).logits - expected) ** 2).mean())


def test_the_default_corrects_and_a_broken_solve_is_seen(monkeypatch):
    """The default config corrects; with the solve broken (only "no correction" left to choose) the default
    run gives the plain model back, which this test tells apart."""
    assert SlicingConfig(sparsity=0.25).correction == "ridge"
    dense = make_low_rank_llama(28)
    calib, test = calibration(128, 32), calibration(8, 32, seed=7)
    default, plain = (
        _logit_error(dense, calib, test, sparsity=0.25),
        _logit_error(dense, calib, test, sparsity=0.25, correction="none"),
    )
    monkeypatch.setattr(correction, "RIDGE_GRID", (math.inf,))
    broken = _logit_error(dense, calib, test, sparsity=0.25)
    assert default < 0.95 * plain
    assert broken == pytest.approx(plain, rel=1e-3)


def test_a_fraction_of_the_batches_is_enough_and_bad_fractions_are_named():
    dense = make_tiny("llama")
    calib, test = calibration(64, 32), calibration(8, 32, seed=7)
    corrected = _logit_error(dense, calib, test, sparsity=0.25, correction_fraction=0.5, batch_size=8)
    assert corrected < _logit_error(dense, calib, test, sparsity=0.25, correction="none")
    for bad in (0.0, 1.5, True, "half"):
        with pytest.raises(SlicingError, match="correction_fraction must be in"):
            hf_slicegpt.slice_model(dense, calib, 0.25, correction_fraction=bad)
    with pytest.raises(SlicingError, match="correction must be one of"):
        hf_slicegpt.slice_model(dense, calib, 0.25, correction="lsq")


def test_the_default_keeps_the_shortcuts_plain_and_the_option_refits_them():
    """By default a shortcut stays the plain change of basis ``q_in^T q_out`` (a product of orthonormal columns:
    no singular value above 1); ``correction_shortcuts=True`` refits it, and the report records which."""
    dense = make_tiny("llama")
    calib = calibration(64, 32)
    top = {}
    for shortcuts in (False, True):
        sliced = hf_slicegpt.slice_model(
            copy.deepcopy(dense), calib, 0.25, correction_shortcuts=shortcuts, show_progress=False
        )
        assert sliced.config.slicing["correction"]["shortcuts"] is shortcuts
        matrices = [m.weight for n, m in sliced.named_modules() if n.endswith("shortcut") and m is not None]
        assert matrices
        top[shortcuts] = max(float(torch.linalg.matrix_norm(w.detach().double(), ord=2)) for w in matrices)
    assert top[False] <= 1 + 1e-5
    assert top[True] > 1 + 1e-3
    with pytest.raises(SlicingError, match="correction_shortcuts must be True or False"):
        SlicingConfig(sparsity=0.25, correction_shortcuts="yes")


def test_global_rotation_corrects_only_the_writers():
    """Global rotation has no shortcut matrices; the correction keeps it so (native export stays possible)."""
    dense = make_tiny("llama")
    calib, test = calibration(64, 32), calibration(8, 32, seed=7)
    options = dict(sparsity=0.25, rotation="global")
    sliced = hf_slicegpt.slice_model(copy.deepcopy(dense), calib, show_progress=False, **options)
    assert not any("shortcut" in name for name, _ in sliced.named_parameters())
    assert _logit_error(dense, calib, test, **options) < _logit_error(
        dense, calib, test, correction="none", **options
    )
    hf_slicegpt.to_native(sliced)  # still exportable to the family's own architecture


def test_resume_with_correction_is_bit_identical(tmp_path):
    dense = make_tiny("llama", num_hidden_layers=3)
    calib = calibration(16, 16)
    options = dict(sparsity=0.25, correction_fraction=0.5, batch_size=4, show_progress=False)
    whole = hf_slicegpt.slice_model(copy.deepcopy(dense), calib, **options)

    class Stop(Exception):
        pass

    state = tmp_path / "state"

    def interrupt(name, cov, signals, masks):
        if name == "layer 2 output":  # in the third block: two blocks are checkpointed
            raise Stop
        return cov

    with pytest.raises(Stop):
        hf_slicegpt.slice_model(
            copy.deepcopy(dense), calib, checkpoint_dir=state, checkpoint_every=1,
            hooks=hf_slicegpt.SlicingHooks(covariance=interrupt), **options,
        )  # fmt: skip
    assert any(state.glob("dense-r0-*.safetensors"))
    resumed = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calib, checkpoint_dir=state, resume=True, **options
    )
    first, second = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert resumed.config.slicing["correction"] == whole.config.slicing["correction"]


def test_dense_bases_are_the_pca_of_the_dense_output():
    """correction_basis="dense" takes each kept basis from the dense model's output (what the correction fits
    the sliced one to): at 0% it is still exact, and the recorded spectra are the dense signals' own."""
    dense = make_low_rank_llama(12)
    calib, test = calibration(32, 16), calibration(4, 16, seed=7)
    options = dict(correction_basis="dense", correction_fraction=1.0, show_progress=False)
    with torch.no_grad():
        expected = dense(test).logits
        exact = hf_slicegpt.slice_model(copy.deepcopy(dense), calib, 0.0, **options)
        assert (exact(test).logits - expected).abs().max() < 1e-4
    seen = []
    hooks = hf_slicegpt.SlicingHooks(
        covariance=lambda name, cov, signals, masks: seen.append((name, len(signals))) or cov
    )
    hf_slicegpt.slice_model(copy.deepcopy(dense), calib, 0.5, hooks=hooks, **options)
    # the embeddings' basis comes from the calibration signals; every later one from the dense targets
    assert seen[0] == ("embeddings", 4)
    assert all(count == 0 for name, count in seen[1:] if "output" in name and "attention" not in name)
    with pytest.raises(SlicingError, match="correction_basis must be one of"):
        SlicingConfig(sparsity=0.25, correction_basis="target")


def test_automatic_fit_step_fits_every_batch_up_to_the_token_cap():
    """``correction_fraction=None``: every batch up to CORRECTION_TOKENS calibration tokens (SmolLM2's 128 x 512
    fits them all), then every k-th batch so that about that many are fitted; padding does not count."""

    def run(num_batches: int, seq_len: int, fraction=None, padded: int = 0):
        mask = torch.ones(8, seq_len, dtype=torch.long)
        mask[:, seq_len - padded :] = 0
        batch = CalibrationBatch(torch.zeros(8, seq_len, dtype=torch.long), mask if padded else None)
        config = SimpleNamespace(correction_fraction=fraction)
        return SimpleNamespace(config=config, all_batches=[batch] * num_batches)

    assert CORRECTION_TOKENS == 65536
    assert fit_step(run(16, 512)) == 1  # 128 x 512: every batch
    assert fit_step(run(64, 512)) == 4  # 512 x 512: every 4th, 65,536 tokens fitted
    assert fit_step(run(64, 1024, padded=512)) == 4  # only unpadded tokens count
    assert fit_step(run(64, 512, fraction=0.5)) == 2  # an explicit share wins
