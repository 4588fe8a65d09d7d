"""slice_model on tiny random LLaMA / OPT / Phi models: exactness at 0%, real slicing at 25%, and bad input.

Sparsity 0 keeps every direction, so the sliced model must compute the dense function: this checks norm folding,
mean baking, rotations and shortcut matrices exactly (up to float32 rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import VOCAB, calibration, make_low_rank_llama, make_tiny
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

import hf_slicegpt
from hf_slicegpt import SlicedModelForCausalLM, SlicingError, slice_model, sliced_width, validate_sparsity

ATOL = 1e-4
# The families (LLaMA untied and tied, OPT, Phi). tests/test_families.py runs the basic checks over every
# tiny family; this file goes deeper on these four: padding, batched generation, dtypes, input validation.
CORE = ["llama", "llama_tied", "opt", "phi"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only cost CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(seed: int = 7) -> tuple[torch.LongTensor, torch.Tensor]:
    """Three random sequences: one full, two left-padded by 4 and 9 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, 14), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 1  # the pad token of the tiny OPT; any id works for the others
    return ids, mask


def _logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _slice(family: str, sparsity: float, **kwargs) -> tuple[PreTrainedModel, SlicedModelForCausalLM]:
    dense = make_tiny(family)
    sliced = slice_model(copy.deepcopy(dense), calibration(), sparsity, show_progress=False, **kwargs)
    return dense, sliced


def _unique_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.fixture(scope="module", params=CORE)
def exact(request) -> tuple[str, PreTrainedModel, SlicedModelForCausalLM]:
    dense, sliced = _slice(request.param, 0.0)
    return request.param, dense, sliced


@pytest.fixture(scope="module", params=CORE)
def quarter(request) -> tuple[str, PreTrainedModel, SlicedModelForCausalLM]:
    dense, sliced = _slice(request.param, 0.25)
    return request.param, dense, sliced


# -- sparsity 0: the same function --------------------------------------------------------------------------
def test_zero_sparsity_reproduces_dense_logits(exact) -> None:
    family, dense, sliced = exact
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = _logits(dense, ids)
    diff = (_logits(sliced, ids) - expected).abs().max().item()
    assert diff < ATOL, f"{family}: 0% slice differs from dense by {diff:.2e}"
    assert expected.abs().max() > 0.05  # the comparison is not between two near-zero tensors


def test_zero_sparsity_with_left_padding(exact) -> None:
    """Padded rows: unpadded positions equal dense; OPT's learned positions skip the padding in both."""
    family, dense, sliced = exact
    ids, mask = _inputs()
    real = mask.bool()
    expected, got = _logits(dense, ids, mask), _logits(sliced, ids, mask)
    diff = (got - expected)[real].abs().max().item()
    assert diff < ATOL, f"{family}: padded batch differs from dense by {diff:.2e}"
    # And a padded row equals the same sequence run alone without padding.
    alone = _logits(sliced, ids[2:3, 9:])
    assert (alone[0] - got[2, 9:]).abs().max().item() < ATOL


@pytest.mark.parametrize("family", CORE)
def test_padded_calibration_batches(family: str) -> None:
    """Iterable calibration with left padding: finite, still exact at 0%, and padding is not counted."""
    cal = calibration(8, 16)
    mask = torch.ones_like(cal)
    mask[:4, :6] = 0
    batches = [{"input_ids": cal[i : i + 4], "attention_mask": mask[i : i + 4]} for i in (0, 4)]
    dense = make_tiny(family)
    sliced = slice_model(copy.deepcopy(dense), batches, 0.0, show_progress=False)
    ids = calibration(2, 12, seed=5)
    assert (_logits(sliced, ids) - _logits(dense, ids)).abs().max().item() < ATOL
    assert sliced.config.slicing["calibration_tokens"] == int(mask.sum())
    cut = slice_model(copy.deepcopy(dense), batches, 0.25, show_progress=False)
    assert torch.isfinite(_logits(cut, ids)).all()


# -- sparsity 0.25 ------------------------------------------------------------------------------------------
def test_quarter_widths_and_parameter_count(quarter) -> None:
    family, dense, sliced = quarter
    hidden = dense.config.hidden_size
    width = sliced_width(hidden, 0.25, 8)
    assert width == 24
    config = sliced.config
    assert config.attn_input_dims == [width] * dense.config.num_hidden_layers
    assert config.head_input_dim == width
    assert config.norm_divisor == hidden
    for name, param in sliced.named_parameters():
        assert param.dtype == torch.float32, name
    assert _unique_parameters(sliced) < _unique_parameters(dense)
    stats = sliced.slicing_stats
    assert stats and all(s.kept_width <= s.width == hidden for s in stats)
    assert all(0 < s.explained_variance <= 1 for s in stats)


def test_quarter_is_close_but_not_equal(quarter) -> None:
    """Slicing really removed something, but the model still tracks the dense one."""
    family, dense, sliced = quarter
    ids = calibration(4, 16, seed=1)  # calibration text: the directions kept are the ones it uses most
    expected, got = _logits(dense, ids), _logits(sliced, ids)
    diff = (got - expected).abs().max().item()
    assert diff > 1e-4, f"{family}: 25% slice is suspiciously exact"
    assert torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.5


def test_tied_llama_stays_tied() -> None:
    dense, sliced = _slice("llama_tied", 0.25)
    assert dense.config.tie_word_embeddings
    assert sliced.lm_head.weight is sliced.model.embed_tokens.weight
    assert sliced.config.tie_word_embeddings
    assert _unique_parameters(sliced) < _unique_parameters(dense)


def test_untied_llama_head_is_sliced() -> None:
    _, sliced = _slice("llama", 0.25)
    assert sliced.lm_head.weight is not sliced.model.embed_tokens.weight
    assert sliced.lm_head.in_features == 24
    assert sliced.model.embed_tokens.embedding_dim == 24


# -- generation ---------------------------------------------------------------------------------------------
def _generate(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=1,
    )


def test_greedy_generate_cache_on_off(quarter) -> None:
    family, _, sliced = quarter
    ids = calibration(1, 6, seed=9)
    mask = torch.ones_like(ids)
    with_cache = _generate(sliced, ids, mask, True)
    assert with_cache.shape == (1, 14)
    assert torch.equal(with_cache, _generate(sliced, ids, mask, False))


def test_batched_generate_with_padding(quarter) -> None:
    """Left-padded batch: cache on == cache off, and each row == the same prompt generated alone."""
    family, _, sliced = quarter
    ids, mask = _inputs(seed=21)
    ids, mask = ids[:, :10], mask[:, :10]
    batched = _generate(sliced, ids, mask, True)
    assert torch.equal(batched, _generate(sliced, ids, mask, False))
    alone = _generate(sliced, ids[1:2, 4:], mask[1:2, 4:], True)
    assert torch.equal(batched[1, 4:], alone[0])


def test_zero_sparsity_generates_like_dense(exact) -> None:
    family, dense, sliced = exact
    ids, mask = _inputs(seed=4)
    assert torch.equal(_generate(sliced, ids, mask, True), _generate(dense, ids, mask, True))


# -- dtypes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "dtype"), [(family, torch.bfloat16) for family in CORE] + [("llama", torch.float16)]
)
def test_half_precision(family: str, dtype: torch.dtype) -> None:
    """The maths runs in float64; weights come back in the model dtype, and 0% stays close to dense."""
    dense = make_tiny(family).to(dtype)
    sliced = slice_model(copy.deepcopy(dense), calibration(), 0.0, show_progress=False)
    assert {p.dtype for p in sliced.parameters()} == {dtype}
    ids = calibration(2, 12, seed=6)
    expected, got = _logits(dense, ids), _logits(sliced, ids)
    # A half-precision model is itself only this close to its float32 original: allow a few of its ulps.
    reference = _logits(make_tiny(family), ids)
    noise = (expected - reference).abs().max().item()
    assert (got - expected).abs().max().item() < max(4 * noise, 1e-3)
    cut = slice_model(copy.deepcopy(dense), calibration(), 0.25, show_progress=False)
    assert {p.dtype for p in cut.parameters()} == {dtype}
    assert cut.config.attn_input_dims[0] == 24
    assert torch.isfinite(_logits(cut, ids)).all()


# -- errors -------------------------------------------------------------------------------------------------
def test_unknown_family_names_model_type_and_supported() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64))
    with pytest.raises(ValueError, match="'gpt2'") as info:
        slice_model(gpt2, calibration(), 0.25, show_progress=False)
    message = str(info.value)
    for supported in ("llama", "opt", "phi"):
        assert supported in message
    assert message.count(",") >= 2  # a list, not one name


def test_post_layernorm_opt_refused() -> None:
    post_ln = make_tiny("opt", do_layer_norm_before=False)
    with pytest.raises(ValueError, match="do_layer_norm_before=False"):
        slice_model(post_ln, calibration(), 0.25, show_progress=False)


@pytest.mark.parametrize(
    ("sparsity", "pattern"),
    [
        (1.0, r"\[0, 1\)"),
        (-0.1, r"\[0, 1\)"),
        (25, r"percentage.*0\.25"),
        (float("nan"), "nan"),
        (True, "True"),
        ("0.25", "'0.25'"),
    ],
)
def test_bad_sparsity(sparsity, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate_sparsity(sparsity)
    with pytest.raises(SlicingError, match=pattern):
        slice_model(make_tiny("llama"), calibration(), sparsity, show_progress=False)


def test_sparsity_one_is_not_called_a_percentage() -> None:
    """1.0 removes everything; suggesting 0.01 ("1%") would send the user the wrong way."""
    with pytest.raises(SlicingError) as info:
        validate_sparsity(1.0)
    assert "0.01" not in str(info.value)


@pytest.mark.parametrize(
    ("calib", "pattern"),
    [
        (torch.empty(0, 16, dtype=torch.long), r"non-empty.*\(0, 16\)"),
        (torch.empty(4, 0, dtype=torch.long), r"non-empty.*\(4, 0\)"),
        ([], "empty"),
        (torch.rand(4, 16), "integer token ids.*float32"),
        (["some text", "more text"], "dict with 'input_ids'.*str"),
        ("some text", "tokenize text first"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, r"single batch.*\[batch\]"),
        (torch.full((2, 8), VOCAB + 5), f"token id {VOCAB + 5}.*{VOCAB} entries"),
        (torch.full((2, 8), -3), "negative"),
        ([{"input_ids": torch.rand(2, 4)}], "batch 0 must hold integer token ids"),
        (
            [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 5)}],
            r"attention_mask shape \(2, 5\)",
        ),
    ],
    ids=[
        "empty-rows",
        "empty-cols",
        "empty-list",
        "float",
        "strings",
        "str",
        "one-batch",
        "oov",
        "negative",
        "float-batch",
        "mask-shape",
    ],
)
def test_bad_calibration(calib, pattern: str) -> None:
    with pytest.raises(SlicingError, match=pattern):
        slice_model(make_tiny("llama"), calib, 0.25, show_progress=False)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"round_to": 0}, "round_to"),
        ({"batch_size": 0}, "batch_size"),
        ({"rotation": "nope"}, "rotation"),
        ({"tied_embeddings": "nope"}, "tied_embeddings"),
    ],
)
def test_bad_options(kwargs: dict, pattern: str) -> None:
    with pytest.raises(SlicingError, match=pattern):
        slice_model(make_tiny("llama"), calibration(), 0.25, show_progress=False, **kwargs)


def test_an_already_sliced_model_is_refused(quarter) -> None:
    _, _, sliced = quarter
    with pytest.raises(SlicingError, match=r"already sliced \(sparsity=0.25\)"):
        slice_model(sliced, calibration(), 0.25, show_progress=False)


def test_sliced_width_rounding() -> None:
    assert sliced_width(576, 0.25, 8) == 432
    assert sliced_width(576, 0.2, 8) == 456  # 460.8 -> 456
    assert sliced_width(32, 0.0, 8) == 32
    assert sliced_width(32, 0.99, 8) == 8  # never below round_to
    assert sliced_width(4, 0.5, 8) == 4  # nor above the hidden size


def test_public_api_exports() -> None:
    assert hf_slicegpt.SlicedModelForCausalLM is SlicedModelForCausalLM
    assert hf_slicegpt.SlicedConfig.model_type == "slicegpt"
    assert {"llama", "opt", "phi"} <= set(hf_slicegpt.supported_model_types())


@pytest.mark.parametrize("mid_basis", ["own", "shared", "auto"])
def test_uneven_widths_are_exact_when_nothing_is_deleted(mid_basis: str) -> None:
    """Every width differs from its neighbours (shortcuts of every shape, shared and own mid bases), yet
    each keeps the whole signal: the sliced model must equal the dense one. This checks the bookkeeping of
    uneven plans (the variance schedule's) exactly, which a sparsity-0 check cannot."""
    from hf_slicegpt.slicing import SlicingHooks

    dense = make_low_rank_llama(rank=12)
    inputs = calibration(2, 12, seed=7)
    reference = dense(inputs).logits

    def uneven(plan):
        n = len(plan.outputs)
        plan.embedding = 16
        plan.outputs = [24, 12, 20, 32][:n]
        plan.mids = [16, 28, 12, 20][:n]
        return plan

    sliced = slice_model(
        dense,
        calibration(),
        0.25,
        round_to=4,
        mid_basis=mid_basis,
        show_progress=False,
        hooks=SlicingHooks(plan=uneven),
    )
    assert sliced.config.embedding_dim == 16
    assert (sliced(inputs).logits - reference).abs().max().item() < 1e-4
