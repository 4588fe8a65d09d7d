"""Tiny random models of every supported family, built in-process (no downloads).

Norm weights and biases are randomised so that folding them is really tested (fresh norms are all ones).
"""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
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


# Shared by the families below: hidden 32, 2 layers, 4 heads with 2 KV heads (GQA), small vocabulary.
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(config_cls, model_cls, defaults: dict, overrides: dict) -> PreTrainedModel:
    config = {**_COMMON, **defaults}
    config.update(overrides)
    return model_cls(config_cls(**config))


def _llama3(**overrides) -> PreTrainedModel:
    """Llama-3.2 style: GQA, tied embeddings, ``llama3`` rope scaling, head_dim * heads != hidden."""
    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
    defaults = dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, rope_parameters=rope)
    return _build(LlamaConfig, LlamaForCausalLM, defaults, overrides)


def _mistral(**overrides) -> PreTrainedModel:
    """A sliding window (4) shorter than the test sequences, so the window really masks."""
    return _build(MistralConfig, MistralForCausalLM, dict(sliding_window=4), overrides)


def _qwen2(**overrides) -> PreTrainedModel:
    """Qwen2.5 style: q/k/v biases, tied embeddings, and one full + one sliding-window layer."""
    defaults = dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return _build(Qwen2Config, Qwen2ForCausalLM, defaults, overrides)


def _qwen3(**overrides) -> PreTrainedModel:
    """Per-head q/k norms (randomised by make_tiny), head_dim 16."""
    return _build(Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False), overrides)


def _phi3(**overrides) -> PreTrainedModel:
    """Phi-3.5 style: fused qkv_proj / gate_up_proj, longrope scaling, partial rotary."""
    rotary_half = int(32 // 4 * 0.5) // 2
    rope = dict(
        rope_type="longrope",
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        short_factor=[1.0 + 0.1 * i for i in range(rotary_half)],
        long_factor=[1.5 + 0.2 * i for i in range(rotary_half)],
    )
    defaults = dict(original_max_position_embeddings=32, rope_parameters=rope)
    return _build(Phi3Config, Phi3ForCausalLM, defaults, overrides)


def _gemma(**overrides) -> PreTrainedModel:
    """Embeddings scaled by sqrt(hidden), norms as (1 + w), tied embeddings, head_dim 16."""
    return _build(GemmaConfig, GemmaForCausalLM, dict(head_dim=16, tie_word_embeddings=True), overrides)


def _gpt_neox(**overrides) -> PreTrainedModel:
    """Pythia style: parallel residual with two LayerNorms, fused query_key_value, rotary_pct 0.25."""
    defaults = dict(num_key_value_heads=None, rotary_pct=0.25, use_parallel_residual=True)
    config = {**_COMMON, **defaults, **overrides}
    config.pop("num_key_value_heads")
    return GPTNeoXForCausalLM(GPTNeoXConfig(**config))


BUILDERS = {
    "llama": _llama,
    "llama_tied": lambda **kw: _llama(tied=True, **kw),
    "opt": _opt,
    "phi": _phi,
    "llama3": _llama3,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma": _gemma,
    "gpt_neox": _gpt_neox,
    "gpt_neox_sequential": lambda **kw: _gpt_neox(**{"use_parallel_residual": False, **kw}),
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


def make_low_rank_llama(rank: int, layers: int = 4, attention_rank: int = 0) -> PreTrainedModel:
    """A tiny LLaMA whose residual stream lives in a low-dimensional subspace at every layer.

    The embedding and every writer (o_proj, down_proj) are projected onto one ``rank``-dimensional subspace,
    so any slice that keeps at least ``rank`` directions at every point deletes nothing and must reproduce the
    dense logits. With ``attention_rank``, the first block's attention writes into another ``attention_rank``
    directions, orthogonal to the embedding's, that only later blocks' inputs contain.
    """
    model = make_tiny("llama", num_hidden_layers=layers)
    total = rank + attention_rank
    basis, _ = torch.linalg.qr(
        torch.randn(model.config.hidden_size, total, generator=torch.Generator().manual_seed(3))
    )
    stream = basis @ basis.T
    embedding = basis[:, :rank] @ basis[:, :rank].T
    attention = basis[:, rank:] @ basis[:, rank:].T if attention_rank else stream
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ embedding)
        for idx, layer in enumerate(model.model.layers):
            writes = attention if idx == 0 else stream
            layer.self_attn.o_proj.weight.copy_(writes @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(stream @ layer.mlp.down_proj.weight)
    return model
