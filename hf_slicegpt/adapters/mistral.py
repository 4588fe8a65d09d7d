"""Mistral: LLaMA's layout, plus an optional sliding attention window.

The window lives in the config (``sliding_window``); the generic sliced model reads it from there to build
sliding-window masks and caches, so the adapter is LLaMA's under another name.
"""

from .base import FamilyAdapter, check_layer_types

MISTRAL = FamilyAdapter(
    name="mistral",
    model_types=("mistral",),
    architectures=("MistralForCausalLM",),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    checks=(check_layer_types,),
)
