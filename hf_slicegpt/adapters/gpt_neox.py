"""GPT-NeoX / Pythia: LayerNorm (with bias) blocks, fused ``query_key_value``, partial rotary.

With ``use_parallel_residual=True`` (the default, all Pythia models) a block computes
``x + Attn(LN1(x)) + MLP(LN2(x))``: a parallel block whose MLP has its own norm on the same input. Each norm's
scale and shift fold into its own readers, after which both are the same weightless RMSNorm. With
``use_parallel_residual=False`` the block is an ordinary sequential pre-norm block, and is sliced as one.
"""

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedConfig

from .base import FamilyAdapter


def _residual_layout(config: PreTrainedConfig) -> Mapping[str, Any]:
    if getattr(config, "use_parallel_residual", True):
        return {}
    return {"topology": "sequential"}


GPT_NEOX = FamilyAdapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    architectures=("GPTNeoXForCausalLM",),
    norm="layer",
    topology="parallel",
    embed_tokens="gpt_neox.embed_in",
    layers="gpt_neox.layers",
    final_norm="gpt_neox.final_layer_norm",
    rotary_emb="gpt_neox.rotary_emb",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    attention="attention",
    attn_inputs=("query_key_value",),
    attn_output="dense",
    mlp_inputs=("dense_h_to_4h",),
    mlp_output="dense_4h_to_h",
    norm_eps_attr="layer_norm_eps",
    attn_cache_kwarg="layer_past",
    variant=_residual_layout,
)
