"""Qwen2 / Qwen2.5 and Qwen3: LLaMA's layout with q/k/v biases (Qwen2) or per-head q/k norms (Qwen3).

Qwen3's ``q_norm``/``k_norm`` act on the head dimension, after the projections, so they are not on the residual
stream and stay untouched. Optional sliding-window layers (``use_sliding_window``, ``layer_types``) are masked
by the generic sliced model from the config.
"""

from .base import FamilyAdapter, check_layer_types

QWEN2 = FamilyAdapter(
    name="qwen2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    checks=(check_layer_types,),
)

QWEN3 = FamilyAdapter(
    name="qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    checks=(check_layer_types,),
)
