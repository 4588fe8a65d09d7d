"""The output-aware correction's maths (hf_slicegpt.slicing.correction): the solve and the ridge choice.

The correction is not wired into the layer loop yet (issue 17); these tests pin the closed-form pieces.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_slicegpt.slicing import correction
from hf_slicegpt.slicing.correction import (
    CorrectionError,
    NormalEquations,
    SplitEquations,
    add_gram_,
    fit_correction,
    held_out_rows,
    ridge_solve,
    select_ridge,
    squared_error,
)


def _equations(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None = None) -> NormalEquations:
    eq = NormalEquations(x.shape[1], t.shape[1])
    eq.add(x, t, w)
    return eq


def _structured(n: int, features: int = 12, targets: int = 5, noise: float = 0.0, seed: int = 0):
    """Correlated features (a few strong directions), a linear target plus optional noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * torch.logspace(0, -2, features)[:, None]
    x = torch.randn(n, features, generator=g) @ mix
    theta = torch.randn(features, targets, generator=g)
    t = x @ theta + noise * torch.randn(n, targets, generator=g)
    return x.double(), t.double(), theta.double()


def test_solve_returns_the_prior_when_it_is_exact_for_every_strength():
    # As the slicer uses it: sums of the prior's residual (zero when the prior is exact) and a zero prior.
    x, t, theta = _structured(200)
    residual = _equations(x, torch.zeros_like(t))
    zero = torch.zeros_like(theta)
    for strength in (0.0, 1e-6, 1e-2, 1.0, math.inf):
        assert torch.equal(ridge_solve(residual, zero, strength), zero)
        assert torch.equal(ridge_solve(residual, zero, strength, fixed=[0, 1]), zero)
    # With the raw sums, on well-conditioned features, the prior comes back too.
    x = torch.randn(200, 6, dtype=torch.float64)
    direct = _equations(x, x @ theta[:6])
    for strength in (0.0, 1e-2, math.inf):
        assert torch.allclose(ridge_solve(direct, theta[:6], strength), theta[:6], atol=1e-8)


def test_solve_matches_least_squares_without_ridge_and_keeps_fixed_rows():
    x, t, _ = _structured(300, noise=0.3)
    eq = _equations(x, t)
    prior = torch.zeros(x.shape[1], t.shape[1], dtype=torch.float64)
    lstsq = torch.linalg.lstsq(x, t).solution
    assert torch.allclose(ridge_solve(eq, prior, 0.0), lstsq, atol=1e-5)
    prior[:3] = 1.0
    solved = ridge_solve(eq, prior, 0.0, fixed=[0, 1, 2])
    assert torch.equal(solved[:3], prior[:3])
    free = torch.linalg.lstsq(x[:, 3:], t - x[:, :3] @ prior[:3]).solution
    assert torch.allclose(solved[3:], free, atol=1e-5)


def test_features_without_energy_keep_their_prior_and_nothing_overflows():
    """A writer whose input is zero on the calibration (a basis that kept nothing) has nothing to fit: its rows
    keep the prior for every strength, and a system with no energy at all returns the prior (found when a
    relative ridge of ~0 divided ~0 by ~0 and overflowed to 1e287)."""
    x, t, _ = _structured(200, noise=0.1)
    x[:, 3] = 0.0
    x[:, 7] *= 1e-9  # energy 1e-18 of the others: float rounding, not signal
    eq = _equations(x, t)
    prior = torch.randn(x.shape[1], t.shape[1], dtype=torch.float64)
    for strength in (0.0, 1e-3, 1.0):
        theta = ridge_solve(eq, prior, strength)
        assert torch.isfinite(theta).all()
        assert torch.equal(theta[[3, 7]], prior[[3, 7]]) and not torch.equal(theta[0], prior[0])
    empty = _equations(torch.zeros_like(x), t)
    assert torch.equal(ridge_solve(empty, prior, 1e-3), prior)
    held = _equations(torch.zeros(40, x.shape[1], dtype=torch.float64), t[:40])
    assert select_ridge(empty, held, prior).strength == math.inf


def test_strong_ridge_pulls_towards_the_prior_not_towards_zero():
    x, t, theta = _structured(100, noise=0.5)
    prior = theta + 0.1
    far = ridge_solve(_equations(x, t), prior, 1e6)
    assert torch.allclose(far, prior, atol=1e-4)


def test_squared_error_from_sums_equals_the_direct_error():
    x, t, theta = _structured(150, noise=0.2)
    w = torch.rand(150, dtype=torch.float64)
    guess = theta + 0.05 * torch.randn_like(theta)
    direct = float((w[:, None] * (x @ guess - t) ** 2).sum())
    assert squared_error(_equations(x, t, w), guess) == pytest.approx(direct, rel=1e-4)


def test_ridge_choice_is_the_least_held_out_error():
    # Few rows, noisy target: an unregularised fit overfits, so the held-out error picks a real ridge.
    x, t, theta = _structured(40, features=30, noise=2.0, seed=3)
    xh, th, _ = _structured(400, features=30, noise=2.0, seed=3)
    th = xh @ theta + 2.0 * torch.randn(400, t.shape[1], generator=torch.Generator().manual_seed(9)).double()
    fit, held = _equations(x, t), _equations(xh, th)
    prior = torch.zeros_like(theta)
    grid = (0.0, 1e-3, 1e-1, 1.0, 10.0, math.inf)
    choice = select_ridge(fit, held, prior, grid=grid)
    direct = {s: float(((xh @ ridge_solve(fit, prior, s) - th) ** 2).sum()) for s in grid}
    assert choice.strength == min(direct, key=direct.get)
    assert choice.strength not in (0.0, math.inf)
    assert choice.fitted_error < direct[0.0]


def test_ridge_choice_keeps_the_prior_when_fitting_does_not_generalise():
    x, t, theta = _structured(60, noise=0.0)
    xh, _, _ = _structured(200, seed=5)
    held = _equations(xh, xh @ theta)  # the prior is exact on held-out rows; the fitted rows are noise
    fit = _equations(x, torch.randn(60, theta.shape[1], generator=torch.Generator().manual_seed(1)).double())
    theta_fit, choice = fit_correction(fit, held, theta)
    assert choice.strength == math.inf
    assert choice.fitted_error == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(theta_fit, theta)


def test_split_equations_hold_out_every_fourth_sequence_and_skip_padding():
    assert held_out_rows(8, 0).tolist() == [False, False, False, True] * 2
    assert held_out_rows(3, 2).tolist() == [False, True, False]
    eqs = SplitEquations(3, 2)
    features, targets = torch.randn(8, 5, 3), torch.randn(8, 5, 2)
    mask = torch.ones(8, 5)
    mask[:, -1] = 0
    eqs.add(features, targets, mask, first_sequence=0)
    assert (eqs.fit.tokens, eqs.held.tokens) == (6 * 4, 2 * 4)


def test_gram_multiplies_the_upper_blocks_and_mirrors_them(monkeypatch):
    # 11 features in blocks of 4: two full blocks and a tail, summed over two chunks of rows.
    monkeypatch.setattr(correction, "GRAM_BLOCK", 4)
    x = torch.randn(50, 11)
    gram = torch.zeros(11, 11, dtype=torch.float64)
    add_gram_(gram, x)
    add_gram_(gram, x[:7])
    expected = x.double().T @ x.double() + x[:7].double().T @ x[:7].double()
    assert torch.allclose(gram, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram[:4, 4:], gram[4:, :4].T) and torch.equal(gram[4:8, 8:], gram[8:, 4:8].T)


def test_fitted_rows_skip_the_target_squares_and_cannot_report_an_error():
    eqs = SplitEquations(3, 2)
    eqs.add(torch.randn(8, 5, 3), torch.randn(8, 5, 2), None, first_sequence=0)
    assert not eqs.fit.squares and not eqs.fit.target_gram.any() and eqs.held.target_gram.any()
    with pytest.raises(CorrectionError, match="squares=False"):
        squared_error(eqs.fit, torch.zeros(3, 2))
    theta, choice = eqs.solve(torch.zeros(3, 2, dtype=torch.float64))  # chosen on the held-out rows only
    assert theta.shape == (3, 2) and choice.strength in correction.RIDGE_GRID


def test_bad_inputs_are_named():
    eq = NormalEquations(3, 2)
    with pytest.raises(CorrectionError, match="expected 3 features"):
        eq.add(torch.randn(4, 5), torch.randn(4, 2))
    with pytest.raises(CorrectionError, match="prior has shape"):
        ridge_solve(eq, torch.zeros(2, 2), 0.1)
    with pytest.raises(CorrectionError, match=">= 0"):
        ridge_solve(eq, torch.zeros(3, 2), -1.0)
