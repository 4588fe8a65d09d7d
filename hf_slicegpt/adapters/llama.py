"""LLaMA 1/2/3.x: pre-RMSNorm sequential blocks, rotary positions (any ``rope_parameters``), gated MLP, GQA.

Llama-3.1's ``llama3`` rope scaling and Llama-3.2's tied embeddings need nothing here: rotary embeddings are
the family's own module, and tied embeddings are handled generically.
"""

from .base import FamilyAdapter

LLAMA = FamilyAdapter(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
)
