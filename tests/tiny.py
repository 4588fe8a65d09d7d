"""Tiny random models of every supported family, built in-process (no downloads).

Norm weights and biases are randomised so that folding them is really tested (fresh norms are all ones).
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedModel,
)

VOCAB = 128


def _llama(tied: bool = False, **overrides) -> PreTrainedModel:
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config))


def _opt(tied: bool = True, **overrides) -> PreTrainedModel:
    config = dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=1,
    )
    config.update(overrides)
    return OPTForCausalLM(OPTConfig(**config))


def _phi(tied: bool = False, **overrides) -> PreTrainedModel:
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        partial_rotary_factor=0.5,
        tie_word_embeddings=tied,
    )
    config.update(overrides)
    return PhiForCausalLM(PhiConfig(**config))


BUILDERS = {
    "llama": _llama,
    "llama_tied": lambda **kw: _llama(tied=True, **kw),
    "opt": _opt,
    "phi": _phi,
}
FAMILIES = sorted(BUILDERS)


def make_tiny(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random fp32 model of ``family`` in eval mode, with non-trivial norms and biases."""
    torch.manual_seed(seed)
    model = BUILDERS[family](**overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif "norm" in name and name.endswith("bias") or name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def calibration(n: int = 8, seq_len: int = 16, seed: int = 1) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=generator)
