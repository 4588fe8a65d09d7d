"""Family adapters, chosen from a model's config (``model_type``, then ``architectures``), never its name."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .base import FamilyAdapter, UnsupportedModelError
from .llama import LLAMA
from .opt import OPT
from .phi import PHI

_REGISTRY: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make a family sliceable; its ``model_types`` must not already be taken."""
    for model_type in adapter.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not adapter:
            raise ValueError(
                f"model_type {model_type!r} already has the adapter {_REGISTRY[model_type].name!r}"
            )
        _REGISTRY[model_type] = adapter
    return adapter


for _adapter in (LLAMA, OPT, PHI):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config: PreTrainedConfig) -> FamilyAdapter:
    """The adapter for ``config``, after checking that the config can be sliced exactly."""
    adapter = _REGISTRY.get(getattr(config, "model_type", None))
    if adapter is None:
        # A family's derivative can declare the family's architecture class; match its prefix.
        for arch in getattr(config, "architectures", None) or []:
            for model_type, candidate in _REGISTRY.items():
                if arch.lower().startswith(model_type.replace("_", "")):
                    adapter = candidate
                    break
            if adapter is not None:
                break
    if adapter is None:
        raise UnsupportedModelError(
            f"Unsupported model_type {getattr(config, 'model_type', None)!r} "
            f"(architectures={getattr(config, 'architectures', None)}). "
            f"Supported model_types: {', '.join(supported_model_types())}."
        )
    adapter.check(config)
    return adapter


__all__ = [
    "FamilyAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
