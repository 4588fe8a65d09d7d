"""What every step of a slicing run shares: the model's facts, the settings, and the state carried between layers.

The steps themselves (``plan``, ``statistics``, ``rotate``, ``assemble``, ``state``, ``loop``) are functions over
one :class:`SlicingRun`; nothing is hidden in a class hierarchy, and the source of the dense blocks is an
explicit :class:`~hf_slicegpt.slicing.source.LayerSource`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapters import FamilyAdapter
from ..modeling.modeling_sliced import SlicedRMSNorm
from .calibration import CalibrationBatch
from .config import SlicingConfig, SlicingError, sliced_width

if TYPE_CHECKING:
    from ..runtime.resume import PartialState
    from .pca import Covariance
    from .plan import WidthPlan
    from .source import LayerSource


@dataclass
class SignalStats:
    """What the calibration data looked like at one point of the residual stream."""

    name: str
    width: int
    kept_width: int
    explained_variance: float
    eigenvalues: list[float] = field(repr=False)


@dataclass
class SlicingHooks:
    """Public extension points for research; each is optional and sees the run's own objects.

    - ``plan(plan) -> WidthPlan``: change the widths before any weight is touched (e.g. depth-tapered widths).
    - ``covariance(name, cov, signals, masks) -> Covariance``: transform a signal's covariance before its
      eigenbasis is taken (e.g. add a prior, or re-sum it from a subset of batches); ``signals`` and ``masks``
      are this rank's calibration batches it was summed from (empty in the dense-statistics pass of global
      rotation, which sums as it goes).
    - ``basis(name, eigenvalues, eigenvectors, width) -> Tensor``: choose the ``(D, width)`` basis kept for a
      signal instead of the leading eigenvectors.
    """

    plan: Callable[[WidthPlan], WidthPlan] | None = None
    covariance: Callable[[str, Covariance, Sequence[torch.Tensor], Sequence[Any]], Covariance] | None = None
    basis: Callable[[str, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None


@dataclass
class RuntimeOptions:
    """Where and how the run computes; none of these changes the sliced weights."""

    device: torch.device
    offload: str | None = None
    offload_dir: str | os.PathLike | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int = 0
    resume: bool = False
    show_progress: bool = True


@dataclass
class SlicingRun:
    """One slicing run: facts fixed at the start, then the state carried from layer to layer."""

    model: PreTrainedModel
    adapter: FamilyAdapter
    config: SlicingConfig
    options: RuntimeOptions
    source: LayerSource
    batches: list[CalibrationBatch]  # this rank's share
    all_batches: list[CalibrationBatch]  # every rank's (the fingerprint and the report count them)
    hooks: SlicingHooks
    hidden: int
    width: int
    tied: bool
    tied_mode: str
    dtype: torch.dtype
    home: torch.device
    eps: float
    norm: SlicedRMSNorm
    # carried state
    stats: list[SignalStats] = field(default_factory=list)
    plan: WidthPlan | None = None
    global_basis: torch.Tensor | None = None
    global_slices: dict[int, torch.Tensor] = field(default_factory=dict)
    position_offset: int | None = None
    variance_fraction: float | None = None
    layer_kinds: list[str] = field(default_factory=list)
    partial: PartialState | None = None
    q_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    # the last basis kept, with all the eigenvectors it was cut from (its frame: ``signals.signal_frame``)
    frame_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    corrections: list[dict[str, Any]] = field(default_factory=list)  # one entry per corrected update

    @property
    def sequential(self) -> bool:
        return self.adapter.topology == "sequential"

    @property
    def layer_norm(self) -> bool:
        return self.adapter.norm == "layer"

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def family_config(self) -> Any:
        return self.model.config

    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.adapter.layers)


def new_run(
    model: PreTrainedModel,
    adapter: FamilyAdapter,
    config: SlicingConfig,
    options: RuntimeOptions,
    source: LayerSource,
    batches: list[CalibrationBatch],
    all_batches: list[CalibrationBatch],
    hooks: SlicingHooks | None = None,
) -> SlicingRun:
    """Read the facts of ``model`` and resolve the tied-embedding mode."""
    hidden = model.config.hidden_size
    embed = model.get_submodule(adapter.embed_tokens)
    lm_head = model.get_submodule(adapter.lm_head)
    tied = lm_head.weight.data_ptr() == embed.weight.data_ptr()
    mode = config.tied_embeddings
    if mode == "auto":
        # One basis everywhere lets the vocabulary matrix be sliced once for both ends; per-layer bases keep it
        # at full width with small projections, which is exact.
        mode = "slice" if config.rotation == "global" and adapter.norm == "rms" else "project"
    if mode == "slice" and adapter.norm != "rms":
        raise SlicingError(
            f"tied_embeddings='slice' needs an RMSNorm family, and {adapter.name} uses LayerNorm: the head reads "
            "the uncentred vocabulary matrix, which a centred slice cannot give exactly. "
            "Use tied_embeddings='project' (the default)."
        )
    eps = getattr(model.config, adapter.norm_eps_attr, None)
    eps = float(eps) if eps is not None else 1e-5
    return SlicingRun(
        model=model,
        adapter=adapter,
        config=config,
        options=options,
        source=source,
        batches=batches,
        all_batches=all_batches,
        hooks=hooks or SlicingHooks(),
        hidden=hidden,
        width=sliced_width(hidden, config.sparsity, config.round_to),
        tied=tied,
        tied_mode=mode if tied else "untie",
        dtype=embed.weight.dtype,
        home=embed.weight.device,
        eps=eps,
        norm=SlicedRMSNorm(hidden, eps),
    )


__all__ = ["RuntimeOptions", "SignalStats", "SlicingHooks", "SlicingRun", "new_run"]
