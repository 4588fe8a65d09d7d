"""Phi-3 / Phi-3.5: pre-RMSNorm sequential blocks with fused ``qkv_proj`` and ``gate_up_proj``.

A fused matrix reads the residual stream like any other reader: only its input side is rotated and sliced, and
the fused output (q|k|v, gate|up) is untouched. ``longrope`` scaling is the family's own rotary module.
"""

from .base import FamilyAdapter, check_layer_types

PHI3 = FamilyAdapter(
    name="phi3",
    model_types=("phi3",),
    architectures=("Phi3ForCausalLM",),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    attn_inputs=("qkv_proj",),
    mlp_inputs=("gate_up_proj",),
    checks=(check_layer_types,),
)
