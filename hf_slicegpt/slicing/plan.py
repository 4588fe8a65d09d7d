"""The width plan: every residual-stream width of the sliced model, decided before any weight is touched."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .context import SlicingRun


@dataclass
class WidthPlan:
    """Every residual-stream width of the sliced model.

    ``shared_mid[l]`` means the MLP of sequential block ``l`` reads the block's input basis, so the attention
    residual needs no shortcut matrix (one ``d x d`` matrix fewer per block).
    """

    embedding: int
    outputs: list[int]
    mids: list[int]
    shared_mid: list[bool]

    @property
    def inputs(self) -> list[int]:
        return [self.embedding, *self.outputs[:-1]]

    @property
    def head(self) -> int:
        return self.outputs[-1]


@dataclass(frozen=True)
class BlockShape:
    """Residual-side sizes of one block: total output features of its readers, input features of writers."""

    attn_readers: int
    attn_writer: int
    mlp_readers: int
    mlp_writer: int

    @property
    def dense(self) -> int:
        return self.attn_readers + self.attn_writer + self.mlp_readers + self.mlp_writer


def block_shapes(run: SlicingRun) -> list[BlockShape]:
    """The residual-side sizes of every block, read from the dense model (shapes only: meta blocks do)."""
    adapter = run.adapter
    shapes = []
    for layer in run.layers():
        attn = layer.get_submodule(adapter.attention)
        mlp_owner = layer if adapter.mlp is None else layer.get_submodule(adapter.mlp)
        shapes.append(
            BlockShape(
                attn_readers=sum(attn.get_submodule(n).out_features for n in adapter.attn_inputs),
                attn_writer=attn.get_submodule(adapter.attn_output).in_features,
                mlp_readers=sum(mlp_owner.get_submodule(n).out_features for n in adapter.mlp_inputs),
                mlp_writer=mlp_owner.get_submodule(adapter.mlp_output).in_features,
            )
        )
    return shapes


def plan_parameters(run: SlicingRun, plan: WidthPlan, shapes: list[BlockShape]) -> int:
    """Width-dependent parameters under ``plan``: blocks (shortcuts included), embeddings and head."""
    vocab, hidden = run.family_config.vocab_size, run.hidden
    d_embed, d_head = plan.embedding, plan.head
    if run.tied_mode == "project":
        total = hidden * (d_embed + d_head)
    elif run.tied_mode == "slice":
        total = vocab * d_embed + d_embed * d_head
    else:
        total = vocab * (d_embed + d_head)
    if run.adapter.embed_positions is not None:
        total += run.family_config.max_position_embeddings * d_embed
    for idx, shape in enumerate(shapes):
        d_in, d_out = plan.inputs[idx], plan.outputs[idx]
        if run.sequential:
            d_mid = plan.mids[idx]
            total += shape.attn_readers * d_in + shape.attn_writer * d_mid
            total += shape.mlp_readers * d_mid + shape.mlp_writer * d_out + d_mid * d_out
            total += 0 if plan.shared_mid[idx] else d_in * d_mid
        else:
            total += (shape.attn_readers + shape.mlp_readers) * d_in
            total += (shape.attn_writer + shape.mlp_writer) * d_out + d_in * d_out
    return total


def decide_mids(run: SlicingRun, plan: WidthPlan, shapes: list[BlockShape]) -> WidthPlan:
    """Share the block input basis with the MLP where a second shortcut would outweigh what slicing saves."""
    if not run.sequential:
        return plan
    for idx, shape in enumerate(shapes):
        d_in, d_mid, d_out = plan.inputs[idx], plan.mids[idx], plan.outputs[idx]
        own = (
            shape.attn_readers * d_in
            + (shape.attn_writer + shape.mlp_readers) * d_mid
            + shape.mlp_writer * d_out
            + d_in * d_mid
            + d_mid * d_out
        )
        mode = run.config.mid_basis
        share = mode == "shared" or (mode == "auto" and own >= shape.dense * run.hidden)
        plan.shared_mid[idx] = share
        if share:
            plan.mids[idx] = d_in
    return plan


def const_plan(run: SlicingRun, n: int) -> WidthPlan:
    """One width everywhere (the head keeps full width with ``slice_head=False``)."""
    head = run.width if run.config.slice_head else run.hidden
    return WidthPlan(run.width, [run.width] * (n - 1) + [head], [run.width] * n, [False] * n)


def _width_for(run: SlicingRun, values: torch.Tensor, fraction: float) -> int:
    """The smallest multiple of ``round_to`` whose leading eigenvalues explain ``fraction`` of the variance."""
    cumulative = torch.cumsum(values, 0) / values.sum().clamp_min(1e-30)
    k = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))) + 1
    round_to = run.config.round_to
    k = math.ceil(k / round_to) * round_to
    return max(round_to, min(k, run.hidden))


def variance_plan(run: SlicingRun, spectra: dict[str, torch.Tensor], shapes: list[BlockShape]) -> WidthPlan:
    """Smallest widths explaining a common variance fraction, with the fraction set by the budget."""
    n = len(shapes)
    budget = plan_parameters(run, decide_mids(run, const_plan(run, n), shapes), shapes)

    def plan_for(fraction: float) -> WidthPlan:
        outputs = [_width_for(run, spectra[f"layer {i} output"], fraction) for i in range(n)]
        if not run.config.slice_head:
            outputs[-1] = run.hidden
        mids = [
            _width_for(run, spectra[f"layer {i} attention output"], fraction) if run.sequential else 0
            for i in range(n)
        ]
        plan = WidthPlan(_width_for(run, spectra["embeddings"], fraction), outputs, mids, [False] * n)
        return decide_mids(run, plan, shapes)

    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if plan_parameters(run, plan_for(mid), shapes) <= budget:
            low = mid
        else:
            high = mid
    run.variance_fraction = low
    return plan_for(low)


__all__ = [
    "BlockShape",
    "WidthPlan",
    "block_shapes",
    "const_plan",
    "decide_mids",
    "plan_parameters",
    "variance_plan",
]
