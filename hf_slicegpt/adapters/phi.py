"""Phi (Phi-1/1.5/2): parallel attention + MLP on one LayerNorm, biases everywhere, partial rotary."""

from .base import FamilyAdapter

PHI = FamilyAdapter(
    name="phi",
    model_types=("phi",),
    architectures=("PhiForCausalLM",),
    norm="layer",
    topology="parallel",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.final_layernorm",
    rotary_emb="model.rotary_emb",
    mlp_norm=None,
    attn_output="dense",
    mlp_inputs=("fc1",),
    mlp_output="fc2",
    norm_eps_attr="layer_norm_eps",
)
