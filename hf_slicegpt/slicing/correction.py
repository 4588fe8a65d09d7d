"""Output-aware correction: refit a sliced block's writers (optionally its shortcut) to the dense model's outputs.

Plain SliceGPT keeps the directions of most input variance and never looks at what the sliced block writes.
Here each residual update of a sliced block,

    y_s = x_s S + sum_i a_i W_i (+ b)          x_s: the sliced block input (width d_in, basis q_in)
                                               a_i: the input of writer i (o_proj, down_proj) on the sliced model
                                               S:   the shortcut (d_in x d_out), W_i: writer i (f_i x d_out)

is refit to the dense model's residual after the same update, rotated into the new basis: ``T = y_d q_out``.
With ``X = [x_s, a_1, .., 1]`` and ``Theta = [S; W_1; ..; b]`` the solve is ridge least squares towards the
un-corrected weights ``Theta0`` (the rotated dense writers and the plain shortcut ``q_in^T q_out``):

    min_Theta  sum_t w_t ||X_t Theta - T_t||^2 + lambda ||P^(1/2) (Theta - Theta0)||^2
    Theta = Theta0 + (X^T W X + lambda P)^(-1) X^T W (T - X Theta0)

with ``P = diag(X^T W X)`` (each feature regularised relative to its own energy, so the residual stream's
massive activations and the writers' inputs are treated alike) and per-token weights ``w_t = 1 / rms(T_t)^2``
(every reader normalises, so a token's relative error is what matters; SmolLM2's first token is ~150x louder).
At 0% sparsity ``T = X Theta0`` exactly, so ``Theta = Theta0`` for every ``lambda``: the correction is exact.
In the layer loop the sums are taken of the residual ``E = T - X Theta0`` (the dense target minus the
un-corrected sliced output, which the loop computes anyway), and the solve is for ``Delta = Theta - Theta0``
towards 0: at 0% sparsity ``E`` is zero up to float32 rounding, so the correction is exact even where the
normal equations are ill-conditioned (summing ``X^T T`` and ``X^T X Theta0`` separately would not cancel).
Rows of ``Theta`` can be held fixed (an identity shortcut between equal bases stays an identity, so the
checkpoint's set of shortcut matrices never changes). By default (``correction_shortcuts=False``) the layer loop
leaves ``x_s`` out of ``X`` altogether: the shortcut stays the plain change of basis and its term stays in the
residual ``E`` (refit shortcuts were measured to extrapolate badly to text unlike the calibration).
``lambda`` is chosen by the error on calibration sequences held out of the fit (``lambda = inf``, i.e. no
correction, is always a candidate), then the solve is redone on all sequences. The normal equations are float64
sums of float32 chunk products, as for covariances; ``X^T W X`` is symmetric, so only its upper block triangle
is multiplied (about 57% of the FLOPs of the full product at 1,968 features), and ``T^T W T`` is summed only on
held-out rows, the only ones whose error is read.

Everything here is pure tensor maths with no knowledge of the layer loop; :mod:`.refit` is the loop's step
that gathers the signals (the dense stream, each writer's input) and applies the solution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import SliceGPTError

logger = logging.getLogger(__name__)

# Relative ridge strengths tried (times each feature's own energy, diag(X^T W X)); ``math.inf`` = no correction.
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, math.inf)
# How token rows are weighted in the fit: "rms" (1 / the dense target's mean square) or "none".
TOKEN_WEIGHTING = "rms"
# Every this-many-th calibration sequence is held out of the fit to choose lambda.
HOLDOUT_EVERY = 4
CHUNK_ROWS = 2048
# Column block of the Gram product: each block row multiplies only the blocks on and right of the diagonal.
GRAM_BLOCK = 256


class CorrectionError(SliceGPTError):
    """Bad input to the correction solve."""


def add_gram_(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x^T x`` (float64 ``gram``), multiplying only the upper block triangle and mirroring it.

    The sum is symmetric, and a full ``x^T x`` would compute every off-diagonal block twice.
    """
    features = x.shape[1]
    for start in range(0, features, GRAM_BLOCK):
        end = min(start + GRAM_BLOCK, features)
        upper = (x[:, start:end].T @ x[:, start:]).to(gram.device, torch.float64)
        gram[start:end, start:] += upper
        gram[end:, start:end] += upper[:, end - start :].T


@dataclass
class NormalEquations:
    """Running float64 sums ``X^T W X``, ``X^T W T`` and (with ``squares``) ``T^T W T`` over weighted token rows.

    ``T^T W T`` only serves :func:`squared_error`; the rows a solve is fitted on never need it.
    """

    features: int
    targets: int
    squares: bool = True
    gram: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    target_gram: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.features, self.features, dtype=torch.float64)
        self.cross = torch.zeros(self.features, self.targets, dtype=torch.float64)
        self.target_gram = torch.zeros(self.targets, self.targets, dtype=torch.float64)

    def add(self, features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add token rows ``features (n, f)``, ``targets (n, t)`` with optional weights ``(n,)`` (0 = skip)."""
        if features.shape[-1] != self.features or targets.shape[-1] != self.targets:
            raise CorrectionError(
                f"expected {self.features} features and {self.targets} targets per row, got "
                f"{features.shape[-1]} and {targets.shape[-1]}"
            )
        # float32 products of row chunks summed in float64 (as hf_slicegpt.pca's "mixed"); float64 rows stay so.
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        x = features.reshape(-1, self.features).to(dtype)
        t = targets.reshape(-1, self.targets).to(dtype)
        if weights is not None:
            w = weights.reshape(-1).to(dtype)
            keep = w > 0
            root = w[keep].sqrt()[:, None]
            x, t = x[keep] * root, t[keep] * root
        device = self.gram.device
        for start in range(0, x.shape[0], CHUNK_ROWS):
            xc, tc = x[start : start + CHUNK_ROWS], t[start : start + CHUNK_ROWS]
            add_gram_(self.gram, xc)
            self.cross += (xc.T @ tc).to(device, torch.float64)
            if self.squares:
                self.target_gram += (tc.T @ tc).to(device, torch.float64)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks, then take rank 0's sums, so that every rank solves the same system."""
        from ..runtime import distributed

        if distributed.world_size() == 1:
            return
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.gram.device)
        squares = (self.target_gram,) if self.squares else ()
        for tensor in (self.gram, self.cross, *squares, tokens):
            distributed.all_reduce_sum_(tensor)
            distributed.broadcast_(tensor)
        self.tokens = int(tokens.item())

    def merged(self, other: NormalEquations) -> NormalEquations:
        """The sums over both sets of rows."""
        out = NormalEquations(self.features, self.targets, self.squares and other.squares)
        out.gram, out.cross = self.gram + other.gram, self.cross + other.cross
        out.target_gram, out.tokens = self.target_gram + other.target_gram, self.tokens + other.tokens
        return out

    def rotated(self, q: torch.Tensor) -> NormalEquations:
        """The same sums for the targets ``T q`` (targets accumulated at full width, basis chosen later)."""
        q = q.to(torch.float64)
        out = NormalEquations(self.features, q.shape[1], self.squares)
        out.gram, out.cross, out.tokens = self.gram, self.cross @ q, self.tokens
        if self.squares:
            out.target_gram = q.T @ self.target_gram @ q
        return out


def squared_error(eq: NormalEquations, theta: torch.Tensor) -> float:
    """``sum_t w_t ||X_t theta - T_t||^2`` from the sums alone."""
    if not eq.squares:
        raise CorrectionError("these normal equations were summed without T^T W T (squares=False): no error")
    theta = theta.to(torch.float64)
    value = (theta * (eq.gram @ theta)).sum() - 2 * (theta * eq.cross).sum() + eq.target_gram.diagonal().sum()
    return max(float(value), 0.0)


def _free_index(features: int, fixed: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    free = torch.ones(features, dtype=torch.bool)
    if fixed is not None:
        free[torch.as_tensor(fixed, dtype=torch.long)] = False
    return free


def ridge_solve(
    eq: NormalEquations, prior: torch.Tensor, strength: float, fixed: Sequence[int] | None = None
) -> torch.Tensor:
    """``argmin ||X theta - T||^2 + strength * ||diag(X^T X)^(1/2) (theta - prior)||^2`` over the free rows.

    Rows listed in ``fixed`` keep their prior values (their contribution moves to the target), and so do rows
    whose feature carries no energy (at most ``1e-12`` of the largest: nothing to fit them on, and a ridge
    relative to their energy would not hold them). ``strength`` ``inf`` returns the prior. Solved by Cholesky in
    float64; a matrix that is not numerically positive definite gets a little more ridge rather than an error.
    """
    prior = prior.to(torch.float64)
    if prior.shape != (eq.features, eq.targets):
        raise CorrectionError(f"prior has shape {tuple(prior.shape)}, expected {(eq.features, eq.targets)}")
    if strength < 0 or math.isnan(strength):
        raise CorrectionError(f"ridge strength must be >= 0, got {strength!r}")
    if math.isinf(strength):
        return prior.clone()
    free = _free_index(eq.features, fixed)
    energy = eq.gram.diagonal()
    top = float(energy[free].max()) if bool(free.any()) else 0.0
    free &= energy > 1e-12 * top  # with no energy at all (top 0), no row is free
    if not bool(free.any()):
        return prior.clone()
    gram = eq.gram[free][:, free]
    # X^T (T - X prior) on the free rows (the layer loop passes a zero prior: its sums are of the residual)
    residual = (eq.cross if not prior.any() else eq.cross - eq.gram @ prior)[free]
    scale = gram.diagonal()
    extra = strength
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(gram + torch.diag(extra * scale))
        if int(info) == 0:
            break
        extra = max(extra * 10, 1e-8)
    else:  # pragma: no cover - only a matrix with NaNs gets here
        raise CorrectionError("the correction's normal equations are not finite")
    theta = prior.clone()
    theta[free] += torch.cholesky_solve(residual, factor)
    return theta


@dataclass
class RidgeChoice:
    strength: float
    errors: dict[float, float]  # held-out squared error per strength
    prior_error: float
    fitted_error: float  # the chosen strength's held-out error


def select_ridge(
    fit: NormalEquations,
    held: NormalEquations,
    prior: torch.Tensor,
    fixed: Sequence[int] | None = None,
    grid: Sequence[float] | None = None,
) -> RidgeChoice:
    """Pick the strength whose fit on ``fit`` has the least squared error on ``held``.

    Ties go to the larger strength (the one closer to the un-corrected weights); ``inf`` (no correction)
    competes like any other value, so a correction that does not generalise is not applied.
    """
    grid = RIDGE_GRID if grid is None else grid
    if not grid:
        raise CorrectionError("the ridge grid is empty; pass at least one strength, e.g. (0.01, inf)")
    errors = {float(s): squared_error(held, ridge_solve(fit, prior, s, fixed)) for s in grid}
    errors = {s: e if math.isfinite(e) else math.inf for s, e in errors.items()}  # an overflow never wins
    best = min(sorted(errors, reverse=True), key=lambda s: errors[s])
    prior_error = squared_error(held, prior.to(torch.float64))
    return RidgeChoice(best, errors, prior_error, errors[best])


def fit_correction(
    fit: NormalEquations,
    held: NormalEquations,
    prior: torch.Tensor,
    fixed: Sequence[int] | None = None,
    grid: Sequence[float] | None = None,
) -> tuple[torch.Tensor, RidgeChoice]:
    """Choose the strength on held-out rows, then solve on all rows with it (the corrected ``Theta``)."""
    if held.tokens == 0:  # too little calibration to hold any out: fall back to a mild fixed ridge
        choice = RidgeChoice(1e-2, {}, float("nan"), float("nan"))
    else:
        choice = select_ridge(fit, held, prior, fixed, grid)
    return ridge_solve(fit.merged(held), prior, choice.strength, fixed), choice


def token_weights(targets: torch.Tensor, mask: torch.Tensor | None, weighting: str = "rms") -> torch.Tensor:
    """Per-token weights ``(...)``: ``1 / mean(T_t^2)`` (``"rms"``) or 1 (``"none"``); 0 on padding."""
    if weighting == "rms":
        weights = 1.0 / targets.to(torch.float32).pow(2).mean(-1).clamp_min(1e-12)
    elif weighting == "none":
        weights = torch.ones(targets.shape[:-1], dtype=torch.float32, device=targets.device)
    else:
        raise CorrectionError(f"token weighting must be 'rms' or 'none', got {weighting!r}")
    if mask is not None:
        weights = weights * mask.to(weights.device, torch.float32)
    return weights


def held_out_rows(batch_size: int, first_sequence: int, every: int = HOLDOUT_EVERY) -> torch.Tensor:
    """Which sequences of a batch are held out (deterministic: every ``every``-th calibration sequence)."""
    index = torch.arange(first_sequence, first_sequence + batch_size)
    return (index % every) == (every - 1) if every > 1 else torch.zeros(batch_size, dtype=torch.bool)


@dataclass
class SplitEquations:
    """Normal equations of one residual update, split into fitted and held-out calibration sequences."""

    features: int
    targets: int
    weighting: str = "rms"
    every: int = HOLDOUT_EVERY
    fit: NormalEquations = field(init=False)
    held: NormalEquations = field(init=False)

    def __post_init__(self) -> None:
        self.fit = NormalEquations(self.features, self.targets, squares=False)  # no error is read on these
        self.held = NormalEquations(self.features, self.targets)

    def add(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None,
        first_sequence: int,
        reference: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: ``features (B, L, f)``, ``targets (B, L, t)``, ``mask (B, L)`` or ``None``.

        Token weights come from ``reference`` (default: the targets), e.g. the dense signal when the targets
        are its residual against the un-corrected output.
        """
        weights = token_weights(targets if reference is None else reference, mask, self.weighting)
        held = held_out_rows(features.shape[0], first_sequence, self.every).to(features.device)
        for part, rows in ((self.fit, ~held), (self.held, held)):
            if bool(rows.any()):
                part.add(features[rows], targets[rows], weights[rows])

    def all_reduce(self) -> None:
        self.fit.all_reduce()
        self.held.all_reduce()

    def rotated(self, q: torch.Tensor) -> SplitEquations:
        out = SplitEquations(self.features, q.shape[1], self.weighting, self.every)
        out.fit, out.held = self.fit.rotated(q), self.held.rotated(q)
        return out

    def solve(
        self, prior: torch.Tensor, fixed: Sequence[int] | None = None, grid: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, RidgeChoice]:
        return fit_correction(self.fit, self.held, prior, fixed, grid)


def with_bias(features: torch.Tensor, bias: bool) -> torch.Tensor:
    """Append the constant feature for a writer bias."""
    if not bias:
        return features
    return torch.cat([features, torch.ones_like(features[..., :1])], dim=-1)


def split_theta(theta: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Cut ``Theta`` into its row blocks ``[S, W_1, .., (b)]``."""
    if sum(sizes) != theta.shape[0]:
        raise CorrectionError(f"row blocks {list(sizes)} do not add up to Theta's {theta.shape[0]} rows")
    return list(torch.split(theta, list(sizes), dim=0))
