"""The declarative description of a model family: where its pieces live, and nothing else.

SliceGPT itself (norm folding, PCA, rotation, slicing) is family-free; it reads a family only through a
:class:`FamilyAdapter`. Adding a family means writing one of these, not touching the algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedConfig

from ..errors import SliceGPTError

# A check returns ``None`` when the config is supported, or the reason it is not.
ConfigCheck = Callable[[PreTrainedConfig], "str | None"]

# The attention layer kinds the generic sliced model can mask (see ``modeling_sliced.attention_layer_kinds``).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(SliceGPTError):
    """The model's family, or one of its settings, cannot be sliced exactly."""


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps the pieces that SliceGPT rotates.

    Paths are dotted attribute paths: model-level ones from the ``*ForCausalLM`` root, block-level ones from a
    decoder layer, attention/MLP linears from the attention/MLP module.

    A fused reader (``qkv_proj``, ``gate_up_proj``, ``query_key_value``) is listed like any other: SliceGPT only
    touches the residual-stream side of a matrix, so fused outputs need nothing special.
    """

    name: str
    model_types: tuple[str, ...]
    norm: Literal["rms", "layer"]
    topology: Literal["sequential", "parallel"]
    embed_tokens: str
    layers: str
    final_norm: str
    # ``*ForCausalLM`` class names that select this adapter when the config's ``model_type`` is not registered
    # (a derivative that reuses the family's code under another model_type). Matched exactly, never by prefix.
    architectures: tuple[str, ...] = ()
    lm_head: str = "lm_head"
    embed_positions: str | None = None
    rotary_emb: str | None = None
    attn_norm: str = "input_layernorm"
    # Sequential blocks: the norm in front of the MLP. Parallel blocks: ``None`` when the MLP reads the attention
    # norm's output (Phi-2), or the name of the MLP's own norm on the same input (GPT-NeoX). Both norms become
    # one weightless RMSNorm after folding, so the sliced block applies a single norm either way.
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
    # The norms multiply by ``weight + norm_weight_offset`` (Gemma's ``x * (1 + w)`` is offset 1.0).
    norm_weight_offset: float = 0.0
    # The embedding output is multiplied by this factor (Gemma: ``sqrt(hidden_size)``); folded into the
    # sliced embedding (or, with tied embeddings, into the small input projection).
    embedding_scale: Callable[[PreTrainedConfig], float] | None = None
    # The keyword under which the family's attention module takes the KV cache (GPT-NeoX: ``layer_past``).
    attn_cache_kwarg: str = "cache"
    # Config-dependent overrides of the fields above, e.g. a flag that turns a parallel block sequential.
    variant: Callable[[PreTrainedConfig], Mapping[str, Any]] | None = None
    checks: tuple[ConfigCheck, ...] = field(default=())

    def check(self, config: PreTrainedConfig) -> None:
        """Raise :class:`UnsupportedModelError` if this config breaks the invariance SliceGPT relies on."""
        for check in self.checks:
            reason = check(config)
            if reason is not None:
                raise UnsupportedModelError(
                    f"Cannot slice this {self.name} model (model_type={config.model_type!r}): {reason}"
                )

    def for_config(self, config: PreTrainedConfig) -> FamilyAdapter:
        """This adapter with the config-dependent overrides of :attr:`variant` applied."""
        if self.variant is None:
            return self
        overrides = dict(self.variant(config))
        return dataclasses.replace(self, **overrides) if overrides else self


def check_layer_types(config: PreTrainedConfig) -> str | None:
    """Refuse attention kinds (chunked, linear, ...) that the generic sliced model cannot mask."""
    layer_types = getattr(config, "layer_types", None)
    unknown = sorted(set(layer_types or ()) - set(SUPPORTED_LAYER_TYPES))
    if unknown:
        return (
            f"layer_types contains {unknown}; only {list(SUPPORTED_LAYER_TYPES)} layers can be sliced "
            "(their attention masks are rebuilt from the config by the sliced model)"
        )
    return None
