"""Tests for hf_slicegpt.workflows.evaluation.perplexity on a tiny random LLaMA built in-process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_slicegpt.workflows.evaluation import PerplexityResult, perplexity

VOCAB = 128
SEQ_LEN = 16


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (5, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def test_single_window_matches_model_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    ids = windows[:1]
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    result = perplexity(model, ids, show_progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.tokens == SEQ_LEN - 1 and result.seq_len == SEQ_LEN


def test_many_windows_is_exp_of_hand_computed_mean_nll(
    model: LlamaForCausalLM, windows: torch.Tensor
) -> None:
    total = 0.0
    with torch.no_grad():
        for row in windows:
            logits = model(input_ids=row[None]).logits[0, :-1].double()
            total += F.cross_entropy(logits, row[1:], reduction="sum").item()
    mean_nll = total / (windows.shape[0] * (SEQ_LEN - 1))
    result = perplexity(model, windows, show_progress=False)
    assert result.tokens == windows.shape[0] * (SEQ_LEN - 1)
    assert result.nll == pytest.approx(mean_nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(mean_nll), rel=1e-5)
    # a random model over 128 tokens is near-uniform
    assert 0.5 * VOCAB < result.perplexity < 2 * VOCAB


@pytest.mark.parametrize("batch_size", [2, 3, 5, 8])
def test_batch_size_invariance(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int) -> None:
    reference = perplexity(model, windows, batch_size=1, show_progress=False)
    result = perplexity(model, windows, batch_size=batch_size, show_progress=False)
    assert result.tokens == reference.tokens
    assert result.nll == pytest.approx(reference.nll, rel=1e-6)


def test_restores_training_mode_and_takes_device(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    model.train()
    try:
        result = perplexity(model, windows[:2], device="cpu", show_progress=True)
        assert model.training
    finally:
        model.eval()
    assert result.nll == pytest.approx(perplexity(model, windows[:2], show_progress=False).nll, rel=1e-6)


def test_half_precision_model_scores_in_float32(windows: torch.Tensor) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    bf16 = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        logits = bf16(input_ids=windows).logits[:, :-1].float()
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()
    result = perplexity(bf16, windows, batch_size=5, show_progress=False)
    assert result.nll == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("ids", "kwargs", "match"),
    [
        (torch.zeros(8, dtype=torch.long), {}, "2-D"),
        (torch.zeros(2, 1, dtype=torch.long), {}, ">= 2 tokens"),
        (torch.zeros(0, 8, dtype=torch.long), {}, "at least one window"),
        (torch.zeros(2, 8), {}, "integer token ids"),
        (torch.zeros(2, 8, dtype=torch.long), {"batch_size": 0}, "batch_size"),
    ],
)
def test_validation(model: LlamaForCausalLM, ids: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        perplexity(model, ids, show_progress=False, **kwargs)
