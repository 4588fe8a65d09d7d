"""Gemma (1): LLaMA's layout with two twists that fold exactly.

- The embedding output is multiplied by ``sqrt(hidden_size)``: the factor is folded into the sliced embedding
  (or, with Gemma's tied embeddings, into the small input projection; the head reads the unscaled table).
- Every norm multiplies by ``(1 + w)``: the folded scale is ``1 + w``.

Gemma-2 and Gemma-3 are refused: their extra norms *after* the attention and MLP outputs
(``post_attention_layernorm``/``post_feedforward_layernorm``) normalise a block's output before it is added to
the residual stream. Such a norm sits between a writer and the stream, where no rotation can pass through it.
"""

from transformers import PreTrainedConfig

from .base import FamilyAdapter

POST_NORM_REASON = (
    "Gemma-2/3 apply norms to the attention and MLP outputs before the residual add "
    "(post_attention_layernorm/post_feedforward_layernorm); a norm on a writer's output does not commute "
    "with the rotation of the residual stream, so SliceGPT's computational invariance does not hold"
)

# model_types that are refused outright, with the reason.
GEMMA_REFUSED = {
    "gemma2": POST_NORM_REASON,
    "gemma3": POST_NORM_REASON,
    "gemma3_text": POST_NORM_REASON,
}


def _embedding_scale(config: PreTrainedConfig) -> float:
    return float(config.hidden_size) ** 0.5


GEMMA = FamilyAdapter(
    name="gemma",
    model_types=("gemma",),
    architectures=("GemmaForCausalLM",),
    norm="rms",
    topology="sequential",
    embed_tokens="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    rotary_emb="model.rotary_emb",
    norm_weight_offset=1.0,
    embedding_scale=_embedding_scale,
)
