"""Property-based tests over random tiny LLaMA-style models (hypothesis).

For every drawn config (hidden size, heads, GQA ratio, head_dim, biases, tied or untied embeddings, layers)
and every drawn slicing setting (sparsity including 0 and rounding edge cases, round_to, rotation):

- slicing succeeds or raises a ``ValueError`` with a message; nothing else;
- every width is in ``[1, hidden]`` and is ``sliced_width`` of the sparsity;
- a 0% slice computes the dense model's logits (max abs difference < 1e-4);
- ``save_pretrained`` -> ``from_pretrained`` gives bit-identical logits, and the checkpoint validates.

The default profile runs 10 derandomized examples per test (tests/conftest.py); ``HYPOTHESIS_PROFILE=long``
runs a longer random search.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from hypothesis import example, given, note
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_slicegpt
from hf_slicegpt.checkpoint.validation import validate_checkpoint
from hf_slicegpt.slicing import sliced_width

VOCAB = 64


@st.composite
def llama_configs(draw: st.DrawFn) -> dict[str, Any]:
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))  # GQA ratios 1, 2, 3
    head_dim = draw(st.sampled_from([4, 6, 8]))  # rotary needs an even head_dim
    # The residual width need not be heads x head_dim (Llama-3.2 style; LlamaConfig still wants a multiple of
    # the head count); slicing only touches its side.
    hidden = heads * draw(st.sampled_from([head_dim, 2, 3, 5, 8]))
    return dict(
        hidden_size=hidden,
        intermediate_size=draw(st.sampled_from([8, 16, 24])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )


# Exact fractions, values whose float product with the hidden size lands just below a whole number (0.8:
# 1 - 0.8 = 0.19999999999999996), the smallest and the largest allowed values, and anything in between.
SPARSITIES = st.one_of(
    st.sampled_from([0.0, 1e-12, 0.01, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.55, 0.8, 0.9, 0.999, 0.9999999]),
    st.floats(0.0, 1.0, exclude_max=True),
)
ROUND_TO = st.sampled_from([1, 2, 3, 4, 8, 16, 64])


def _model(config: dict[str, Any], seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def _ids(seed: int, n: int = 4, length: int = 12) -> torch.LongTensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _expected_width(hidden: int, sparsity: float, round_to: int) -> int:
    """Exact arithmetic on the decimal the user typed (``repr``): the largest multiple of round_to kept.

    A block short by less than 1e-9 of a whole one counts as whole (floating-point noise, as documented).
    """
    if sparsity == 0:
        return hidden
    blocks = hidden * (1 - Fraction(repr(sparsity))) / round_to
    whole = math.ceil(blocks) if math.ceil(blocks) - blocks < Fraction(1, 10**9) else math.floor(blocks)
    return max(min(whole * round_to, hidden), min(round_to, hidden))


@given(
    config=llama_configs(),
    sparsity=SPARSITIES,
    round_to=ROUND_TO,
    rotation=st.sampled_from(["layer", "global"]),
)
@example(
    config=dict(
        hidden_size=20, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, vocab_size=VOCAB,
        max_position_embeddings=64,
    ),
    sparsity=0.8, round_to=4, rotation="layer",
)  # fmt: skip
def test_slicing_succeeds_or_refuses_clearly_and_round_trips(
    config: dict[str, Any], sparsity: float, round_to: int, rotation: str
) -> None:
    model = _model(config, seed=0)
    hidden = config["hidden_size"]
    ids = _ids(1)
    dense_logits = model(ids).logits
    try:
        sliced = hf_slicegpt.slice_model(
            model, _ids(2, n=6), sparsity, round_to=round_to, rotation=rotation, show_progress=False
        )
    except ValueError as err:
        message = str(err)
        note(f"refused: {message}")
        assert message and "\n" not in message
        return
    cfg = sliced.config
    widths = [cfg.embedding_dim, cfg.head_input_dim, *cfg.attn_input_dims, *(cfg.mlp_input_dims or [])]
    assert all(1 <= w <= hidden for w in widths), widths
    # The residual stream keeps exactly the width the sparsity asks for (the MLP input may share it).
    assert (
        cfg.embedding_dim
        == _expected_width(hidden, sparsity, round_to)
        == sliced_width(hidden, sparsity, round_to)
    )

    logits = sliced(ids).logits
    assert torch.isfinite(logits).all()
    if sparsity == 0:
        assert (logits - dense_logits).abs().max() < 1e-4

    directory = Path(tempfile.mkdtemp(prefix="prop-"))
    try:
        sliced.save_pretrained(directory)
        assert validate_checkpoint(directory).sliced
        reloaded = AutoModelForCausalLM.from_pretrained(directory)
        saved = sliced.state_dict()
        for name, tensor in reloaded.state_dict().items():
            assert torch.equal(tensor, saved[name]), name  # the weights round-trip bit for bit
        # Loading fuses the readers into input-major matrices, so the same weights reach the BLAS kernels in
        # another layout: equal up to rounding, not bit for bit.
        assert ((reloaded(ids).logits - logits).abs().max() / logits.abs().max()).item() < 1e-5
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@given(
    hidden=st.integers(1, 8192),
    sparsity=st.one_of(
        SPARSITIES, st.floats(-10, 200), st.sampled_from([math.nan, math.inf, 1, 25, 100, True])
    ),
    round_to=st.integers(1, 128),
)
def test_sliced_width_is_exact_and_validation_is_clear(hidden: int, sparsity: Any, round_to: int) -> None:
    try:
        value = hf_slicegpt.validate_sparsity(sparsity)
    except ValueError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert 0 <= value < 1
    width = sliced_width(hidden, value, round_to)
    assert 1 <= width <= hidden
    assert width == _expected_width(hidden, value, round_to)
