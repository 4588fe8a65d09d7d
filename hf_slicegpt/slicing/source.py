"""Where the layer loop gets dense blocks from, and where finished sliced blocks go.

:class:`InMemoryLayers` serves a model held in memory. The low-memory path passes
:class:`hf_slicegpt.runtime.streaming.StreamedLayers`, which loads each block from safetensors shards and
writes each finished block to disk. The loop only speaks this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .context import SlicingRun


@dataclass
class SlicedBlock:
    """One finished block: the family's attention and MLP modules with sliced residual sides, and shortcuts."""

    attn: nn.Module
    mlp: nn.Module
    attn_shortcut: nn.Linear | None
    mlp_shortcut: nn.Linear | None

    def tensors(self, idx: int) -> dict[str, torch.Tensor]:
        """The block's tensors under the names of the sliced checkpoint."""
        prefix = f"model.layers.{idx}."
        out = {f"{prefix}self_attn.{k}": v for k, v in self.attn.state_dict().items()}
        out.update({f"{prefix}mlp.{k}": v for k, v in self.mlp.state_dict().items()})
        if self.attn_shortcut is not None:
            out[f"{prefix}attn_shortcut.weight"] = self.attn_shortcut.weight
        if self.mlp_shortcut is not None:
            out[f"{prefix}mlp_shortcut.weight"] = self.mlp_shortcut.weight
        return out


class LayerSource(Protocol):
    """The dense blocks of a model, one at a time."""

    #: finished blocks restored from a partial state stay shapes only (their weights are on disk)
    restore_meta: bool

    def fetch(self, idx: int, device: torch.device) -> nn.Module:
        """Dense block ``idx`` on ``device``."""

    def release(self, idx: int) -> None:
        """Dense block ``idx`` after the dense-statistics pass, which the slicing pass will fetch again."""

    def finish(self, run: SlicingRun, idx: int, block: SlicedBlock, restored: bool) -> None:
        """Keep sliced block ``idx`` for the returned model (and record it in the partial state)."""

    def may_stay_meta(self, name: str) -> bool:
        """Whether a tensor of the returned model may be left on the meta device."""


class InMemoryLayers:
    """The blocks of a model in memory; each dense block is replaced by ``nn.Identity`` once it is sliced."""

    restore_meta = False

    def __init__(self, layers: nn.ModuleList, home: torch.device):
        self.layers = layers
        self.home = home

    def fetch(self, idx: int, device: torch.device) -> nn.Module:
        return self.layers[idx].to(device)

    def release(self, idx: int) -> None:
        self.layers[idx].to(self.home)

    def finish(self, run: SlicingRun, idx: int, block: SlicedBlock, restored: bool) -> None:
        if run.partial is not None and not restored:
            run.partial.write_layer(idx, block.tensors(idx))
        block.attn.to(self.home)
        block.mlp.to(self.home)
        self.layers[idx] = nn.Identity()  # the dense block is consumed

    def may_stay_meta(self, name: str) -> bool:
        return False


__all__ = ["InMemoryLayers", "LayerSource", "SlicedBlock"]
