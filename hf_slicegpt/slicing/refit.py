"""The output-aware correction as a step of the layer loop; the maths is in :mod:`.correction`.

For each residual update of a block (sequential: the attention, then the MLP; parallel: both at once):

1. :func:`dense_targets` runs the *dense* block on the dense stream, before any of its weights is touched: the
   dense model's residual after the update is the target (centred for LayerNorm families, as the sliced stream
   is). The dense stream is kept only on the batches the correction fits on (``correction_fraction``).
2. :func:`update_pass` computes the sliced update as the plain loop does (``x q_from^T + branch(x)``, full
   width) and also captures each writer's input ``a_i``, summing the normal equations of ``[x, a_1.., 1]``
   against the residual ``target - output`` (zero at 0% sparsity: the correction is exact there).
3. :func:`apply_correction`, once the next basis is chosen and the writers are rotated into it, solves for the
   change of ``[shortcut; writers; bias]`` in the new coordinates, sets the modules, and returns the corrected
   sliced signals ``x S + a W + b`` that the next update reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..runtime import distributed
from ..runtime.offload import ActivationStore
from .calibration import token_count
from .config import CORRECTION_TOKENS
from .context import SlicingRun
from .correction import SplitEquations, split_theta, with_bias
from .pca import Covariance
from .rotate import replace_module, to_linear, writers_in_frame
from .signals import Residual, block_output, drain, expand, layer_kwargs, new_store, update_frame
from .statistics import new_covariance

logger = logging.getLogger(__name__)

Writers = list[tuple[nn.Module, str]]


@dataclass
class DenseStream:
    """The dense model's residual stream on the batches the correction fits on (full width, centred)."""

    signals: ActivationStore
    fit: list[bool]  # per local calibration batch: whether the correction fits on it
    first: list[int]  # per local batch: the calibration-wide index of its first sequence (held-out choice)


@dataclass
class PendingUpdate:
    """A sliced update whose correction is summed but not yet solved (its output basis is chosen next)."""

    name: str
    equations: SplitEquations
    inputs: ActivationStore  # each batch's writer inputs, concatenated
    writers: Writers
    sizes: list[int]  # row blocks of Theta: shortcut (0 rows when it is not refit), each writer, (bias)
    bias: bool
    q_from: torch.Tensor
    target_covariance: Covariance | None = None  # the dense targets' (``correction_basis="dense"``)


def correcting(run: SlicingRun) -> bool:
    return run.config.correction != "none"


def _centred(run: SlicingRun, signal: torch.Tensor) -> torch.Tensor:
    """The dense signal as the sliced stream represents it (mean-free for LayerNorm families)."""
    signal = signal.to(torch.float32)
    return signal - signal.mean(-1, keepdim=True) if run.layer_norm else signal


def fit_step(run: SlicingRun) -> int:
    """The correction fits on every ``step``-th calibration batch: ``1 / correction_fraction``, or with
    ``None`` the largest step that still fits on about ``CORRECTION_TOKENS`` tokens."""
    fraction = run.config.correction_fraction
    if fraction is not None:
        return max(1, round(1 / fraction))
    return max(1, token_count(run.all_batches) // CORRECTION_TOKENS)


def fit_batches(run: SlicingRun) -> tuple[list[bool], list[int]]:
    """Which of this rank's batches the correction fits on (every :func:`fit_step`-th batch of the whole
    calibration set, so the choice does not depend on the number of ranks), and their first sequences."""
    step = fit_step(run)
    sizes = [int(b.input_ids.shape[0]) for b in run.all_batches]
    offset = distributed.shard_start(len(sizes))
    fit = [(offset + i) % step == 0 for i in range(len(run.batches))]
    first = [sum(sizes[: offset + i]) for i in range(len(run.batches))]
    return fit, first


def start_dense_stream(run: SlicingRun, embedded: ActivationStore) -> DenseStream:
    """The dense stream at the embeddings: the embedded calibration batches the correction fits on."""
    fit, first = fit_batches(run)
    signals = drain(run, (_centred(run, x).to(run.dtype) for x, keep in zip(embedded, fit) if keep))
    return DenseStream(signals, fit, first)


def _updated(run: SlicingRun, x: torch.Tensor, kwargs: dict[str, Any], q_from: torch.Tensor, branch):
    out = expand(run, x, q_from)
    for term in branch(x, kwargs):
        out = out + term
    return out


def _framed(x: torch.Tensor, kwargs: dict[str, Any], branch) -> torch.Tensor:
    """The same residual in the frame of ``q_from`` (the writers write into it): ``[x, 0] + branch(x)``, in at
    least float32 (a float64 run keeps float64, as ``x q_from^T + branch(x)`` promotes to it)."""
    out = None
    for term in branch(x, kwargs):
        out = term.to(torch.promote_types(term.dtype, torch.float32)) if out is None else out + term
    out[..., : x.shape[-1]] += x
    return out


@torch.no_grad()
def dense_targets(
    run: SlicingRun, layer: nn.Module, idx: int, stream: DenseStream, kwargs: list[dict[str, Any]]
) -> ActivationStore | None:
    """Run dense block ``idx`` on the stream, which advances to its output; return the residual after the
    attention (sequential blocks; ``None`` for parallel ones). Call before the block's weights are rotated."""
    mids = new_store(run) if run.sequential else None
    sink: list[torch.Tensor] = []
    hook = layer.get_submodule(run.adapter.attention).register_forward_hook(
        lambda _m, _i, out: sink.append(block_output(out))
    )
    fit_kwargs = [kw for kw, keep in zip(kwargs, stream.fit) if keep]

    def outputs():
        for x, kw in zip(stream.signals, fit_kwargs):
            sink.clear()
            out = block_output(layer(x, **layer_kwargs(run, kw, idx)))
            if mids is not None:
                mids.append(_centred(run, x + sink[0]).to(run.dtype))
            yield _centred(run, out).to(run.dtype)

    try:
        stream.signals = drain(run, outputs())
    finally:
        hook.remove()
    return mids


def update_pass(
    run: SlicingRun,
    name: str,
    calib: Any,
    q_from: torch.Tensor,
    branch: Callable[[torch.Tensor, dict[str, Any]], tuple[torch.Tensor, ...]],
    writers: Writers,
    stream: DenseStream | None,
    targets: ActivationStore | None,
) -> tuple[Residual, PendingUpdate | None]:
    """``x q_from^T + branch(x)`` per batch (the residual after one update, full width; the branch's terms are
    added in order); with the correction, also each writer's input and the normal equations against the target.

    A plain update is summed in the frame of ``q_from`` where :func:`~.signals.update_frame` gives one
    (:class:`~.signals.Residual`); a corrected one in the stream's coordinates, as its dense targets are."""
    if stream is None or targets is None:
        frame = update_frame(run, q_from)
        with writers_in_frame(writers, frame, run.dtype, run.device):
            if frame is None:
                batches = (_updated(run, x, kw, q_from, branch) for x, kw in zip(calib.signals, calib.kwargs))
            else:
                batches = (_framed(x, kw, branch) for x, kw in zip(calib.signals, calib.kwargs))
            return Residual(drain(run, batches), frame), None
    modules = [parent.get_submodule(writer) for parent, writer in writers]
    bias = any(m.bias is not None for m in modules)
    # The sliced input is a feature only when the shortcut is refit; otherwise its plain term stays in `out`.
    lead = q_from.shape[1] if run.config.correction_shortcuts else 0
    sizes = [lead, *(m.in_features for m in modules), *([1] if bias else [])]
    pending = PendingUpdate(
        name, SplitEquations(sum(sizes), run.hidden), new_store(run), writers, sizes, bias, q_from
    )
    if run.config.correction_basis == "dense":
        pending.target_covariance = new_covariance(run, name)
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for m in modules]

    def outputs():
        dense = iter(targets)
        for i, (x, kw, mask) in enumerate(zip(calib.signals, calib.kwargs, calib.masks)):
            captured.clear()
            out = _updated(run, x, kw, q_from, branch)
            inputs = torch.cat([c.to(torch.float32) for c in captured], dim=-1)
            if stream.fit[i]:
                target = next(dense).to(torch.float32)
                features = with_bias(
                    torch.cat([x.to(torch.float32), inputs], dim=-1) if lead else inputs, bias
                )
                # the residual of the un-corrected output (zero at 0%), each token weighted by its dense target
                pending.equations.add(features, target - out, mask, stream.first[i], reference=target)
                if pending.target_covariance is not None:
                    pending.target_covariance.add(target, mask)
            pending.inputs.append(inputs.to(run.dtype))
            yield out

    try:
        full = drain(run, outputs())
    finally:
        for handle in handles:
            handle.remove()
    return Residual(full), pending


def _prior(pending: PendingUpdate, modules: list[nn.Module], shortcut: nn.Linear | None) -> torch.Tensor:
    """The un-corrected ``Theta = [S; W_1; ..; b]`` (float64, CPU): the plain rotated weights (``S`` only
    when the shortcut is refit)."""
    blocks = [_plain_shortcut(pending, shortcut).to("cpu", torch.float64)] if pending.sizes[0] else []
    blocks += [m.weight.detach().to("cpu", torch.float64).T for m in modules]
    if pending.bias:
        biases = [m.bias.detach().to("cpu", torch.float64) for m in modules if m.bias is not None]
        blocks.append(torch.stack(biases).sum(0)[None, :])
    return torch.cat(blocks, dim=0)


def _plain_shortcut(pending: PendingUpdate, shortcut: nn.Linear | None) -> torch.Tensor:
    """``S`` as ``x S`` applies it (``d_in x d_out``): the identity where the bases are equal."""
    if shortcut is None:
        return torch.eye(pending.q_from.shape[1], dtype=torch.float64)
    return shortcut.weight.detach().T


def _set_writers(run: SlicingRun, pending: PendingUpdate, modules, parts, prior: torch.Tensor) -> None:
    """Replace each writer by its corrected weights; the fitted bias change goes to the first biased writer."""
    delta = parts[-1][0] - prior[-1] if pending.bias else None
    for k, ((parent, name), module) in enumerate(zip(pending.writers, modules)):
        bias = None if module.bias is None else module.bias.detach().to("cpu", torch.float64)
        if bias is not None and delta is not None:
            bias, delta = bias + delta, None
        replace_module(parent, name, to_linear(parts[1 + k].T, bias, run.dtype, run.device))


def apply_correction(
    run: SlicingRun,
    pending: PendingUpdate,
    signals: ActivationStore,
    q_to: torch.Tensor,
    shortcut: nn.Linear | None,
) -> tuple[nn.Linear | None, ActivationStore]:
    """Solve the update's correction in the basis ``q_to`` (the writers already rotated into it); set the
    writers, return the corrected shortcut (``None`` stays an identity) and the corrected sliced signals."""
    modules = [parent.get_submodule(name) for parent, name in pending.writers]
    prior = _prior(pending, modules, shortcut)
    fixed = list(range(pending.sizes[0])) if shortcut is None else None  # an identity stays an identity
    equations = pending.equations.rotated(q_to.to("cpu", torch.float64))
    equations.all_reduce()
    delta, choice = equations.solve(torch.zeros_like(prior), fixed)
    run.corrections.append(
        {
            "signal": pending.name,
            "strength": choice.strength,
            "held_out_error": [choice.prior_error, choice.fitted_error],
        }
    )
    logger.debug(
        "%s: ridge %g, held-out error %.4g -> %.4g",
        pending.name,
        choice.strength,
        choice.prior_error,
        choice.fitted_error,
    )
    theta = prior + delta
    parts = split_theta(theta, pending.sizes)
    s32 = None  # the shortcut as the corrected signals apply it; None: an identity
    if shortcut is not None:
        s32 = parts[0] if pending.sizes[0] else _plain_shortcut(pending, shortcut)
        s32 = s32.to(run.device, torch.float32)
        if pending.sizes[0]:
            shortcut = to_linear(parts[0].T, None, run.dtype, run.home)
    _set_writers(run, pending, modules, parts, prior)
    w32 = torch.cat(parts[1 : 1 + len(modules)]).to(run.device, torch.float32)
    b32 = parts[-1][0].to(run.device, torch.float32) if pending.bias else 0.0

    def carried(x: torch.Tensor) -> torch.Tensor:  # the shortcut's term: x itself where it is an identity
        x = x.to(torch.float32)
        return x if s32 is None else x @ s32

    corrected = drain(
        run,
        (
            (carried(x) + a.to(torch.float32) @ w32 + b32).to(run.dtype)
            for x, a in zip(signals, pending.inputs)
        ),
    )
    return shortcut, corrected


__all__ = [
    "DenseStream",
    "PendingUpdate",
    "apply_correction",
    "correcting",
    "dense_targets",
    "fit_batches",
    "start_dense_stream",
    "update_pass",
]
