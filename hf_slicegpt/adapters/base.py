"""The declarative description of a model family: where its pieces live, and nothing else.

SliceGPT itself (norm folding, PCA, rotation, slicing) is family-free; it reads a family only through a
:class:`FamilyAdapter`. Adding a family means writing one of these, not touching the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedConfig

# A check returns ``None`` when the config is supported, or the reason it is not.
ConfigCheck = Callable[[PreTrainedConfig], "str | None"]


class UnsupportedModelError(ValueError):
    """The model's family, or one of its settings, cannot be sliced exactly."""


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps the pieces that SliceGPT rotates.

    Paths are dotted attribute paths: model-level ones from the ``*ForCausalLM`` root, block-level ones from a
    decoder layer, attention/MLP linears from the attention/MLP module.
    """

    name: str
    model_types: tuple[str, ...]
    norm: Literal["rms", "layer"]
    topology: Literal["sequential", "parallel"]
    embed_tokens: str
    layers: str
    final_norm: str
    lm_head: str = "lm_head"
    embed_positions: str | None = None
    rotary_emb: str | None = None
    attn_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"
    attention: str = "self_attn"
    attn_inputs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attn_output: str = "o_proj"
    # ``None``: the MLP linears sit directly on the block (OPT) and are moved into a generic feed-forward.
    mlp: str | None = "mlp"
    mlp_inputs: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_output: str = "down_proj"
    # Config attribute holding the activation name, for blocks without an MLP module.
    mlp_activation_attr: str | None = None
    norm_eps_attr: str = "rms_norm_eps"
    checks: tuple[ConfigCheck, ...] = field(default=())

    def check(self, config: PreTrainedConfig) -> None:
        """Raise :class:`UnsupportedModelError` if this config breaks the invariance SliceGPT relies on."""
        for check in self.checks:
            reason = check(config)
            if reason is not None:
                raise UnsupportedModelError(
                    f"Cannot slice this {self.name} model (model_type={config.model_type!r}): {reason}"
                )
