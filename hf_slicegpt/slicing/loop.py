"""The layer loop: each block is rotated and sliced in turn, on signals from the already-sliced blocks above it.

Each layer is computed once over the calibration tokens. Its inputs come from the already-sliced layers above
it, so errors do not compound. Attention and MLP outputs are rotated after the fact instead of recomputed.

Per block (sequential topology): fold the attention norm into the readers and rotate them to the input basis;
compute the attention residual ``h`` at full width, take its basis ``q_mid`` (or share ``q_in``), rotate the
attention writer and add the shortcut ``q_in -> q_mid``; the same for the MLP with ``q_out``.

With ``correction="ridge"`` (:mod:`.refit`) a dense stream runs alongside: each dense block is computed before
it is rotated, and after each update's basis is chosen its writers (and with ``correction_shortcuts`` its
shortcut) are refit to the dense output.
The corrected signals, not the rotated plain output, then feed the next update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..runtime import distributed
from ..runtime.offload import ActivationStore
from .context import SlicingRun
from .plan import WidthPlan, block_shapes, const_plan, decide_mids, variance_plan
from .refit import (
    DenseStream,
    PendingUpdate,
    apply_correction,
    correcting,
    dense_targets,
    start_dense_stream,
    update_pass,
)
from .rotate import center_writer_module, norm_parameters, rotate_readers, rotate_writer, shortcut
from .signals import Masks, attention, embed_calibration, mlp_module, rotate_signals
from .source import SlicedBlock
from .state import open_partial, restore_layers, restore_plan, save_checkpoint
from .statistics import add_vocab_prior, basis, check_shared_mid, covariance, dense_statistics, next_basis


@dataclass
class _Calibration:
    """The calibration signals in the current basis (``None`` under plain global rotation, which needs none),
    and the dense stream when the output-aware correction runs."""

    signals: ActivationStore | None
    kwargs: list[dict[str, Any]] | None
    masks: Masks | None
    stream: DenseStream | None = None

    @property
    def needed(self) -> bool:
        return self.kwargs is not None


def plan_widths(run: SlicingRun, n: int, record: dict[str, Any] | None) -> WidthPlan:
    """The width plan (and the global basis): saved in a resumed run, else from the dense pass if needed.

    The ``plan`` hook sees the const plan before mid-basis sharing is decided (so sharing follows the hooked
    widths), or the variance schedule's final plan.
    """
    if record is not None:
        return restore_plan(run, record)  # the saved plan is final
    cfg, shapes = run.config, block_shapes(run)
    spectra = None
    if cfg.rotation == "global" or cfg.schedule == "variance":
        spectra, total = dense_statistics(run, cfg.schedule == "variance", cfg.rotation == "global")
        if total is not None:
            run.global_basis = basis(run, total, run.hidden)
    plan = variance_plan(run, spectra, shapes) if cfg.schedule == "variance" else const_plan(run, n)
    if run.hooks.plan is not None:
        plan = run.hooks.plan(plan)
    if cfg.rotation == "global":
        plan.shared_mid = [True] * n
    elif cfg.schedule == "const":
        plan = decide_mids(run, plan, shapes)
    return plan


def _first_basis(run: SlicingRun, calib: _Calibration) -> torch.Tensor:
    """The embedding basis; the calibration signals are rotated into it."""
    if run.global_basis is not None:
        q_in = next_basis(run, None, None, "embeddings", run.plan.embedding)
    else:
        cov = covariance(run, calib.signals, calib.masks, "embeddings")
        cov.all_reduce()  # before the prior, which must be added once, not once per rank
        add_vocab_prior(run, cov)
        q_in = basis(run, cov, run.plan.embedding)
    if calib.needed:
        calib.signals = rotate_signals(run, calib.signals, q_in)
    return q_in


def _choose_basis(
    run: SlicingRun, full, calib: _Calibration, pending: PendingUpdate | None, name: str, width
):
    """The next basis: the PCA of the sliced output (the paper), or with ``correction_basis="dense"`` of the
    dense output that the correction fits it to."""
    cov = None if pending is None or run.global_basis is not None else pending.target_covariance
    if cov is None:
        return next_basis(run, full, calib.masks, name, width)
    return basis(run, run.hooks.covariance(name, cov, (), ()) if run.hooks.covariance else cov, width)


def _advance(run: SlicingRun, calib: _Calibration, pending: PendingUpdate | None, q: torch.Tensor, sc):
    """After an update whose basis is ``q``: with a correction, solve it and carry the corrected signals."""
    if pending is None:
        return sc
    sc, calib.signals = apply_correction(run, pending, calib.signals, q, sc)
    return sc


def _readers(run: SlicingRun, parent, names, norm, q: torch.Tensor) -> None:
    scale, shift = norm_parameters(norm, run.hidden, run.adapter.norm_weight_offset)
    rotate_readers(parent, names, scale, shift, q, run.dtype, run.device)


def _mlp_names(run: SlicingRun) -> tuple[tuple[str, ...], str]:
    adapter = run.adapter
    return (("fc1",), "fc2") if adapter.mlp is None else (adapter.mlp_inputs, adapter.mlp_output)


def _sequential_block(run: SlicingRun, idx: int, layer, attn, mlp, q_in, calib: _Calibration, mid_targets):
    """Slice a pre-norm sequential block: two residual signals, two bases, up to two shortcuts."""
    adapter, plan, stream = run.adapter, run.plan, calib.stream
    mlp_readers, mlp_writer = _mlp_names(run)
    full = pending = None
    if calib.needed:
        full, pending = update_pass(
            run, f"layer {idx} attention output", calib, q_in,
            lambda x, kw: (attention(run, attn, x, kw),), [(attn, adapter.attn_output)], stream, mid_targets,
        )  # fmt: skip
    if plan.shared_mid[idx]:
        q_mid = q_in
        if calib.needed and run.config.mid_basis == "auto" and run.global_basis is None:
            q_mid = check_shared_mid(run, idx, full, calib.masks, q_in)
    else:
        q_mid = _choose_basis(run, full, calib, pending, f"layer {idx} attention output", plan.mids[idx])
    rotate_writer(attn, adapter.attn_output, q_mid, run.dtype, run.device)
    _readers(run, mlp, mlp_readers, layer.get_submodule(adapter.mlp_norm), q_mid)
    attn_shortcut = shortcut(q_in, q_mid, run.dtype, run.home)
    if calib.needed:
        # Drop each activation set as soon as it is used: at most one full-width set is alive.
        if pending is None:
            calib.signals = rotate_signals(run, full.signals, q_mid, full.frame)
        full = None
        attn_shortcut = _advance(run, calib, pending, q_mid, attn_shortcut)
        full, pending = update_pass(
            run, f"layer {idx} output", calib, q_mid, lambda x, kw: (mlp(run.norm(x)),),
            [(mlp, mlp_writer)], stream, None if stream is None else stream.signals,
        )  # fmt: skip
    q_out = _choose_basis(run, full, calib, pending, f"layer {idx} output", plan.outputs[idx])
    rotate_writer(mlp, mlp_writer, q_out, run.dtype, run.device)
    mlp_shortcut = shortcut(q_mid, q_out, run.dtype, run.home)
    if pending is not None:
        full, mlp_shortcut = None, _advance(run, calib, pending, q_out, mlp_shortcut)
    return SlicedBlock(attn, mlp, attn_shortcut, mlp_shortcut), q_out, full


def _parallel_block(run: SlicingRun, idx: int, layer, attn, mlp, q_in, calib: _Calibration, _mid_targets):
    """Slice a parallel block: attention and MLP read the same input and write one output."""
    adapter, stream = run.adapter, calib.stream
    mlp_readers, mlp_writer = _mlp_names(run)
    # The MLP of a parallel block reads the attention norm's output, or its own norm of the same input.
    attn_norm = layer.get_submodule(adapter.attn_norm)
    mlp_norm = layer.get_submodule(adapter.mlp_norm) if adapter.mlp_norm else attn_norm
    _readers(run, mlp, mlp_readers, mlp_norm, q_in)
    full = pending = None
    if calib.needed:
        full, pending = update_pass(
            run, f"layer {idx} output", calib, q_in,
            lambda x, kw: (attention(run, attn, x, kw), mlp(run.norm(x))),
            [(attn, adapter.attn_output), (mlp, mlp_writer)], stream, None if stream is None else stream.signals,
        )  # fmt: skip
    q_out = _choose_basis(run, full, calib, pending, f"layer {idx} output", run.plan.outputs[idx])
    rotate_writer(attn, adapter.attn_output, q_out, run.dtype, run.device)
    rotate_writer(mlp, mlp_writer, q_out, run.dtype, run.device)
    block_shortcut = shortcut(q_in, q_out, run.dtype, run.home)
    if pending is not None:
        full, block_shortcut = None, _advance(run, calib, pending, q_out, block_shortcut)
    return SlicedBlock(attn, mlp, block_shortcut, None), q_out, full


def slice_block(run: SlicingRun, idx: int, q_in: torch.Tensor, calib: _Calibration):
    """Rotate and slice dense block ``idx`` whose input is in basis ``q_in``; return it and its output basis."""
    adapter = run.adapter
    layer = run.source.fetch(idx, run.device)
    # the dense block's outputs (the correction's targets) before any of its weights is touched
    mid_targets = None if calib.stream is None else dense_targets(run, layer, idx, calib.stream, calib.kwargs)
    attn, mlp = layer.get_submodule(adapter.attention), mlp_module(run, layer)
    _readers(run, attn, adapter.attn_inputs, layer.get_submodule(adapter.attn_norm), q_in)
    if run.layer_norm:
        center_writer_module(attn, adapter.attn_output, run.dtype, run.device)
        center_writer_module(mlp, _mlp_names(run)[1], run.dtype, run.device)
    step = _sequential_block if run.sequential else _parallel_block
    block, q_out, full = step(run, idx, layer, attn, mlp, q_in, calib, mid_targets)
    if full is not None:  # (a corrected block has already carried its signals forward)
        calib.signals = None  # the block input is used up
        calib.signals = rotate_signals(run, full.signals, q_out, full.frame)
    del full, mid_targets
    return block, q_out


@torch.no_grad()
def slice_layers(run: SlicingRun):
    """The whole run: plan, first basis, every block in order, then the assembled sliced model."""
    from .assemble import assemble

    run.model.eval()
    n = len(run.layers())
    record = open_partial(run, n)
    run.plan = plan_widths(run, n, record)
    # With a global basis and no correction nothing below needs the calibration signals: it only rotates weights.
    needed = run.global_basis is None or correcting(run)
    calib = _Calibration(*embed_calibration(run)) if needed else _Calibration(None, None, None)
    blocks: list[SlicedBlock] = []
    if record is not None:
        start, q_embed, q_in, calib.signals, calib.stream = restore_layers(run, record, calib.needed, blocks)
    else:
        calib.stream = start_dense_stream(run, calib.signals) if correcting(run) else None
        start, q_in = 0, _first_basis(run, calib)
        q_embed = q_in
    quiet = not run.options.show_progress or not distributed.is_main_process()
    for idx in tqdm(
        range(start, n), desc="Slicing layers", unit="layer", initial=start, total=n, disable=quiet
    ):
        block, q_in = slice_block(run, idx, q_in, calib)
        blocks.append(block)
        run.source.finish(run, idx, block, restored=False)
        save_checkpoint(run, idx + 1, n, q_embed, q_in, calib.signals, calib.stream)
    return assemble(run, q_embed, q_in, blocks)


__all__ = ["plan_widths", "slice_block", "slice_layers"]
