"""LLaMA and Mistral: pre-RMSNorm sequential blocks, rotary positions, gated MLP."""

from .base import FamilyAdapter

LLAMA = FamilyAdapter(
    name="llama",
    model_types=("llama", "mistral"),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
)
