"""OPT: pre-LayerNorm sequential blocks, learned absolute positions, fc1/fc2 on the block itself."""

from transformers import PreTrainedConfig

from .base import FamilyAdapter


def _pre_layer_norm(config: PreTrainedConfig) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return (
            "do_layer_norm_before=False (post-LayerNorm, e.g. OPT-350m) puts a norm on the residual stream itself, "
            "which no rotation can pass through; only pre-LayerNorm OPT models can be sliced"
        )
    return None


def _no_projection(config: PreTrainedConfig) -> str | None:
    if config.word_embed_proj_dim != config.hidden_size:
        return (
            f"word_embed_proj_dim={config.word_embed_proj_dim} differs from hidden_size={config.hidden_size}; "
            "embedding projections (project_in/project_out) are not supported"
        )
    return None


def _final_norm(config: PreTrainedConfig) -> str | None:
    if getattr(config, "_remove_final_layer_norm", False):
        return "_remove_final_layer_norm=True leaves no final norm to fold into the head"
    if not getattr(config, "layer_norm_elementwise_affine", True):
        return "layer_norm_elementwise_affine=False is not supported"
    return None


OPT = FamilyAdapter(
    name="opt",
    model_types=("opt",),
    architectures=("OPTForCausalLM",),
    norm="layer",
    topology="sequential",
    embed_tokens="model.decoder.embed_tokens",
    embed_positions="model.decoder.embed_positions",
    layers="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    attn_output="out_proj",
    mlp=None,
    mlp_inputs=("fc1",),
    mlp_output="fc2",
    mlp_activation_attr="activation_function",
    norm_eps_attr="layer_norm_eps",
    checks=(_pre_layer_norm, _no_projection, _final_norm),
)
