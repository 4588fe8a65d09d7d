"""Covariance accumulation in float64 and the eigenbasis SliceGPT rotates onto."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class NonFiniteSignalError(ValueError):
    """A calibration signal holds NaN or Inf, so no basis can be computed from it."""


class Covariance:
    """Running ``sum X^T X`` over the unpadded tokens of a signal, accumulated in float64."""

    def __init__(self, width: int, device: torch.device | str = "cpu", name: str = "signal"):
        self.width = width
        self.name = name
        self.sum = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, signal: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch ``(..., width)``; ``mask`` (``(...)``, 1 = real token) drops padding."""
        x = signal.reshape(-1, signal.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool).to(x.device)]
        if x.numel() == 0:
            return
        x = x.to(device=self.sum.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise NonFiniteSignalError(
                f"the calibration signal {self.name} holds NaN or Inf values (an overflow in the model dtype?); "
                "slice with --dtype float32 or bfloat16"
            )
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks, when ``torch.distributed`` is initialised."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            tokens = torch.tensor([self.tokens], dtype=torch.float64, device=self.sum.device)
            torch.distributed.all_reduce(self.sum)
            torch.distributed.all_reduce(tokens)
            self.tokens = int(tokens.item())


def eigenbasis(cov: Covariance, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the covariance, in float64 on the CPU.

    A multiple of the identity (``damping`` times the mean eigenvalue, as in the paper) is added so that
    rank-deficient covariances decompose stably; it changes no eigenvector. Each eigenvector's sign is fixed
    (largest entry positive) so that the basis is reproducible.
    """
    matrix = cov.sum.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise NonFiniteSignalError(
            f"the covariance of {cov.name} holds NaN or Inf; slice with --dtype float32 or bfloat16"
        )
    if cov.tokens == 0:
        raise ValueError(
            f"no calibration tokens reached {cov.name}: the calibration set is empty or fully padded"
        )
    if cov.tokens < cov.width:
        logger.warning(
            "%s: only %d calibration tokens for width %d; the covariance is rank-deficient and damped. "
            "Use more calibration samples for a reliable basis.",
            cov.name,
            cov.tokens,
            cov.width,
        )
    matrix = (matrix + matrix.T) / 2
    mean_diag = matrix.diagonal().mean()
    matrix = matrix + damping * mean_diag * torch.eye(matrix.shape[0], dtype=torch.float64)
    values, vectors = torch.linalg.eigh(matrix)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order] - damping * mean_diag, vectors[:, order]
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return values.clamp_min(0), vectors * signs
