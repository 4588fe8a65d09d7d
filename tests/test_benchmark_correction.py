"""The correction benchmark's research hooks (benchmarks/correction.py): weighting the broad mix's windows, and
weighting each basis by its next readers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "correction.py"
_SPEC = importlib.util.spec_from_file_location("correction_benchmark", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _sliced_logits(calib: torch.Tensor, hooks=None) -> torch.Tensor:
    from tiny import calibration, make_tiny

    import hf_slicegpt

    torch.manual_seed(0)
    model = make_tiny("llama")
    sliced = hf_slicegpt.slice_model(
        model, calib, 0.25, round_to=4, batch_size=3, correction="none", hooks=hooks, show_progress=False
    )
    with torch.no_grad():
        return sliced(calibration(2, 16, seed=9)).logits


def _identity_hook():
    """The plain reference for a hooked run: any ``covariance`` hook makes the loop sum each signal in the stream's
    own coordinates (no frames, ``hf_slicegpt.slicing.signals.Residual``), so bit-for-bit comparisons need one."""
    from hf_slicegpt.slicing import SlicingHooks

    return SlicingHooks(covariance=lambda name, cov, signals, masks: cov)


def test_weighing_the_last_windows_twice_equals_calibrating_on_them_twice():
    """Weight 2 on the windows from ``first`` on gives the bases of a calibration that holds them twice (the
    covariances are the same sums); weight 1 changes nothing. Batches of 3 split the weighted windows unevenly."""
    from tiny import calibration

    calib = calibration(8, 16, seed=3)
    first = 5
    plain = _sliced_logits(calib, _identity_hook())
    assert torch.equal(_sliced_logits(calib, bench.weigh_last_windows(first, 1.0)), plain)
    twice = _sliced_logits(torch.cat([calib, calib[first:]]))
    weighted = _sliced_logits(calib, bench.weigh_last_windows(first, 2.0))
    torch.testing.assert_close(weighted, twice, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(weighted, plain, rtol=1e-3, atol=1e-3)


def test_reader_weighted_bases_reduce_to_the_pca_at_alpha_zero_and_weigh_by_the_readers():
    """alpha 0 keeps the paper's bases; otherwise the covariance becomes G^(1/2) C G^(1/2), with G built from the
    next readers' weights times their norm's weight (here the last block's output: the final norm and the head).
    Slicing with the hook visits every signal a Llama model has (embeddings, attention outputs, block outputs)."""
    from tiny import calibration, make_tiny

    from hf_slicegpt.slicing import Covariance

    calib = calibration(6, 16, seed=3)
    torch.manual_seed(0)
    dense = make_tiny("llama")
    assert torch.equal(
        _sliced_logits(calib, bench.reader_weighted(dense, 0.0)), _sliced_logits(calib, _identity_hook())
    )
    assert not torch.allclose(
        _sliced_logits(calib, bench.reader_weighted(dense, 0.5)), _sliced_logits(calib), rtol=1e-3, atol=1e-3
    )

    width = dense.config.hidden_size
    cov = Covariance(width, name="x")
    cov.add(torch.randn(40, width, generator=torch.Generator().manual_seed(1)))
    last = f"layer {dense.config.num_hidden_layers - 1} output"
    weighted = bench.reader_weighted(dense, 1.0).covariance(last, cov, (), ())
    r = (dense.lm_head.weight * dense.model.norm.weight).detach().double()
    g = r.T @ r / (r.T @ r).diagonal().mean()
    values, vectors = torch.linalg.eigh(g)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    torch.testing.assert_close(weighted.sum, root @ cov.sum @ root)
    assert weighted.tokens == cov.tokens == 40
