"""Computational invariance: turn every norm into a weightless RMSNorm without changing the function.

All helpers work on float64 tensors in ``nn.Linear`` layout (``weight`` is ``(out, in)``); the slicing driver
converts each module once, applies folding, centring and rotation, and writes back once in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_parameters(
    norm: nn.Module, width: int, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale ``g`` and shift ``b`` of a RMSNorm/LayerNorm, in float64 (``g`` = 1 if it has no weight).

    ``weight_offset`` is for norms that multiply by ``weight + offset`` (Gemma's ``1 + w``).
    """
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    scale = (
        torch.ones(width, dtype=torch.float64)
        if weight is None
        else weight.detach().to(torch.float64).cpu() + weight_offset
    )
    shift = None if bias is None else bias.detach().to(torch.float64).cpu()
    return scale, shift


def fold_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold ``N(x) * g + b`` into a reader ``y = (.) W^T + c``: ``W <- W diag(g)``, ``c <- c + W b``."""
    new_bias = bias
    if shift is not None:
        extra = weight @ shift
        new_bias = extra if bias is None else bias + extra
    return weight * scale[None, :], new_bias


def center_rows(weight: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the hidden dimension of an embedding table ``(num, D)``."""
    return weight - weight.mean(dim=1, keepdim=True)


def center_writer(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Make a linear that writes into the residual stream produce mean-free outputs.

    With every writer mean-free, LayerNorm's mean subtraction is a no-op and it equals an RMSNorm.
    """
    weight = weight - weight.mean(dim=0, keepdim=True)
    if bias is not None:
        bias = bias - bias.mean()
    return weight, bias
