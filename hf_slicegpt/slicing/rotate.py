"""Computational invariance and the rotation of weights: fold norms, centre writers, rotate and slice.

The tensor helpers work on float64 tensors in ``nn.Linear`` layout (``weight`` is ``(out, in)``); the module
helpers convert each linear once, apply folding, centring and rotation, and write back once in the model dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..adapters import FamilyAdapter
from .pca import reduced_float32


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


def to_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: Any) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` (no random initialisation: built on meta)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype).contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype).contiguous())
    return linear


def replace_module(parent: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, attr, module)


def _float64(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = linear.weight.detach().to("cpu", torch.float64)
    return weight, None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64)


def rotate_readers(
    parent: nn.Module,
    names: tuple[str, ...],
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    q: torch.Tensor,
    dtype: torch.dtype,
    device: Any,
) -> None:
    """Fold the norm ``(scale, shift)`` into the linears that read it, and make them read the basis ``q``."""
    for name in names:
        weight, bias = fold_norm(*_float64(parent.get_submodule(name)), scale, shift)
        replace_module(parent, name, to_linear(weight @ q, bias, dtype, device))


def center_writer_module(parent: nn.Module, name: str, dtype: torch.dtype, device: Any) -> None:
    """Make ``parent.<name>`` write mean-free outputs (LayerNorm families)."""
    weight, bias = center_writer(*_float64(parent.get_submodule(name)))
    replace_module(parent, name, to_linear(weight, bias, dtype, device))


def rotate_writer(parent: nn.Module, name: str, q: torch.Tensor, dtype: torch.dtype, device: Any) -> None:
    """Make ``parent.<name>`` write into the basis ``q``."""
    weight, bias = _float64(parent.get_submodule(name))
    replace_module(parent, name, to_linear(q.T @ weight, None if bias is None else q.T @ bias, dtype, device))


@contextlib.contextmanager
def writers_in_frame(
    writers: list[tuple[nn.Module, str]], frame: torch.Tensor | None, dtype: torch.dtype, device: Any
) -> Iterator[None]:
    """Within the block, each writer writes ``y F`` (``F = frame``) instead of ``y``; its own weights come back
    after, to be rotated from them. (In float32 for a float32 model, as these outputs feed float32 statistics;
    in float64 for a float64 model, or where float32 products would run in TF32.)"""
    if frame is None:
        yield
        return
    originals = [(parent, name, parent.get_submodule(name)) for parent, name in writers]
    work = torch.float64 if dtype == torch.float64 or reduced_float32(torch.device(device)) else torch.float32
    f = frame.to(device=device, dtype=work)
    try:
        for parent, name, linear in originals:
            weight = f.T @ linear.weight.detach().to(device, work)
            bias = None if linear.bias is None else linear.bias.detach().to(device, work) @ f
            replace_module(parent, name, to_linear(weight, bias, dtype, device))
        yield
    finally:
        for parent, name, linear in originals:
            replace_module(parent, name, linear)


def shortcut(q_from: torch.Tensor, q_to: torch.Tensor, dtype: torch.dtype, device: Any) -> nn.Linear | None:
    """The residual's change of basis; ``None`` (identity) when both ends share the basis."""
    if q_from is q_to:
        return None
    return to_linear(q_to.T @ q_from, None, dtype, device)


def embedding_scale(adapter: FamilyAdapter, config: Any, dtype: torch.dtype) -> float:
    """The factor on the embedding output (1 for most families), rounded to the model dtype as applied."""
    if adapter.embedding_scale is None:
        return 1.0
    return float(torch.tensor(adapter.embedding_scale(config), dtype=dtype))
