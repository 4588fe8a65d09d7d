"""Family adapters, chosen from a model's config (``model_type``, then ``architectures``), never its name."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .base import SUPPORTED_LAYER_TYPES, FamilyAdapter, UnsupportedModelError, check_layer_types
from .gemma import GEMMA, GEMMA_REFUSED
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .mistral import MISTRAL
from .opt import OPT
from .phi import PHI
from .phi3 import PHI3
from .qwen import QWEN2, QWEN3

_REGISTRY: dict[str, FamilyAdapter] = {}
# model_types that are known and cannot be sliced exactly, with the reason (shown to the user).
_REFUSED: dict[str, str] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make a family sliceable; its ``model_types`` must not already be taken."""
    for model_type in adapter.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not adapter:
            raise ValueError(
                f"model_type {model_type!r} already has the adapter {_REGISTRY[model_type].name!r}"
            )
        _REGISTRY[model_type] = adapter
        _REFUSED.pop(model_type, None)
    return adapter


def refuse_model_type(model_type: str, reason: str) -> None:
    """Declare a known ``model_type`` unsliceable, so users get ``reason`` instead of "unsupported"."""
    if model_type in _REGISTRY:
        raise ValueError(f"model_type {model_type!r} has the adapter {_REGISTRY[model_type].name!r}")
    _REFUSED[model_type] = reason


for _adapter in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA, GPT_NEOX, OPT, PHI):
    register_adapter(_adapter)
for _model_type, _reason in GEMMA_REFUSED.items():
    refuse_model_type(_model_type, _reason)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def registered_adapters() -> list[FamilyAdapter]:
    """Every registered adapter, once each (several model_types may share one)."""
    return list({id(adapter): adapter for adapter in _REGISTRY.values()}.values())


def lora_target_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The attention and MLP linear names of every registered family, as a sliced model names them.

    A sliced block keeps the family's attention and MLP modules, so these are the adapters' reader and writer
    names (a family whose MLP linears sit loose in the block gets them wrapped as ``fc1``/``fc2``). RFT and
    PEFT's default targets are derived from them: a newly registered family brings its own.
    """
    attention: dict[str, None] = {}
    mlp: dict[str, None] = {}
    for adapter in registered_adapters():
        attention.update(dict.fromkeys((*adapter.attn_inputs, adapter.attn_output)))
        names = ("fc1", "fc2") if adapter.mlp is None else (*adapter.mlp_inputs, adapter.mlp_output)
        mlp.update(dict.fromkeys(names))
    return tuple(attention), tuple(mlp)


def refused_model_types() -> dict[str, str]:
    """Known model_types that cannot be sliced exactly, and why."""
    return dict(_REFUSED)


def _lookup(config: PreTrainedConfig) -> FamilyAdapter | None:
    model_type = getattr(config, "model_type", None)
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"Cannot slice model_type={model_type!r}: {_REFUSED[model_type]}")
    adapter = _REGISTRY.get(model_type)
    if adapter is not None:
        return adapter
    # A family's derivative can declare the family's architecture class under its own model_type. Match class
    # names exactly: a prefix would send e.g. Qwen2MoeForCausalLM to the dense Qwen2 adapter.
    for arch in getattr(config, "architectures", None) or []:
        for candidate in _REGISTRY.values():
            if arch in candidate.architectures:
                return candidate
    return None


def get_adapter(config: PreTrainedConfig) -> FamilyAdapter:
    """The adapter for ``config`` (with its config-dependent variant applied), after checking that the config
    can be sliced exactly."""
    adapter = _lookup(config)
    if adapter is None:
        raise UnsupportedModelError(
            f"Unsupported model_type {getattr(config, 'model_type', None)!r} "
            f"(architectures={getattr(config, 'architectures', None)}). "
            f"Supported model_types: {', '.join(supported_model_types())}. "
            "Adding a family takes one declarative FamilyAdapter (see CONTRIBUTING.md)."
        )
    adapter.check(config)
    return adapter.for_config(config)


__all__ = [
    "lora_target_names",
    "SUPPORTED_LAYER_TYPES",
    "FamilyAdapter",
    "UnsupportedModelError",
    "check_layer_types",
    "get_adapter",
    "refuse_model_type",
    "refused_model_types",
    "register_adapter",
    "registered_adapters",
    "supported_model_types",
]
