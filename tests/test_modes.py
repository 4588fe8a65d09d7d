"""Slicing modes (issue: smaller and more deployable): exactness, round trips, tying, native export, size."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, calibration, make_low_rank_llama, make_tiny
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.adapters import get_adapter
from hf_slicegpt.checkpoint.export import NativeExportError, save_native, to_native
from hf_slicegpt.slicing import SlicingError

MODES = {
    "layer-const": dict(rotation="layer", schedule="const"),
    "layer-variance": dict(rotation="layer", schedule="variance"),
    "layer-shared-mid": dict(rotation="layer", mid_basis="shared"),
    "global": dict(rotation="global"),
}
INPUTS = calibration(2, 12, seed=7)


def _slice(family: str, sparsity: float, **kwargs):
    dense = make_tiny(family)
    reference = dense(INPUTS).logits
    sliced = hf_slicegpt.slice_model(
        dense, calibration(), sparsity, round_to=4, show_progress=False, **kwargs
    )
    return sliced, reference


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_mode_is_exact_at_zero_sparsity(family: str, mode: str) -> None:
    sliced, reference = _slice(family, 0.0, **MODES[mode])
    assert (sliced(INPUTS).logits - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", ["llama", "llama_tied", "opt", "phi", "gemma", "gpt_neox"])
def test_every_mode_round_trips_at_25_percent(family: str, mode: str, tmp_path) -> None:
    sliced, _ = _slice(family, 0.25, **MODES[mode])
    sliced.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(INPUTS).logits, sliced(INPUTS).logits)
    assert loaded.config.attn_input_dims == sliced.config.attn_input_dims
    assert loaded.config.slicing["rotation"] == MODES[mode]["rotation"]


def test_global_rotation_needs_no_shortcuts() -> None:
    sliced, _ = _slice("llama", 0.25, rotation="global")
    assert not any(sliced.config.attn_shortcuts) and not any(sliced.config.mlp_shortcuts)
    assert all(block.attn_shortcut is None and block.mlp_shortcut is None for block in sliced.model.layers)


def test_variance_schedule_respects_the_budget_and_varies_widths() -> None:
    const, _ = _slice("opt", 0.25)
    variance, _ = _slice("opt", 0.25, schedule="variance")
    assert _params(variance) <= _params(const) * 1.02
    widths = set(variance.config.attn_input_dims) | set(variance.config.mlp_input_dims)
    assert all(w % 4 == 0 for w in widths)
    assert 0 < variance.config.slicing["variance_fraction"] < 1


def test_variance_schedule_is_not_captured_by_a_massive_activation(monkeypatch) -> None:
    """A token whose residual norm dwarfs the others (an attention sink) must not set the widths on its own.

    Token 0 starts every sequence. Scaling its embedding 1000x would put ~100% of the first signal's raw
    variance in one direction, and a raw-variance schedule would then keep a single ``round_to`` of width for
    it. The schedule's spectra weigh every token the same, so that scale must not change the first spectrum.
    """
    from hf_slicegpt.slicing import loop

    seen: list[torch.Tensor] = []
    original = loop.variance_plan

    def spy(run, spectra, shapes):
        seen.append(spectra["embeddings"] / spectra["embeddings"].sum())
        return original(run, spectra, shapes)

    monkeypatch.setattr(loop, "variance_plan", spy)
    ids = calibration()
    ids[:, 0] = 0
    for scale in (1.0, 1000.0):
        dense = make_tiny("llama")
        with torch.no_grad():
            dense.model.embed_tokens.weight[0] *= scale
        hf_slicegpt.slice_model(dense, ids, 0.25, round_to=4, schedule="variance", show_progress=False)
    assert seen[1][0] < 0.5, f"one direction holds {seen[1][0]:.1%} of the schedule's variance"
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", ["project", "slice"])
def test_tied_embeddings_stay_tied(mode: str, tmp_path) -> None:
    sliced, _ = _slice("llama_tied", 0.25, tied_embeddings=mode)
    assert sliced.lm_head.weight is sliced.model.embed_tokens.weight
    sliced.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert _params(loaded) < _params(make_tiny("llama_tied"))


def test_untie_is_the_reference_layout() -> None:
    sliced, _ = _slice("llama_tied", 0.25, tied_embeddings="untie")
    assert sliced.lm_head.weight.data_ptr() != sliced.model.embed_tokens.weight.data_ptr()
    assert not sliced.config.tie_word_embeddings


def test_slice_mode_refused_for_layernorm_families() -> None:
    with pytest.raises(SlicingError, match="RMSNorm family"):
        _slice("opt", 0.25, tied_embeddings="slice")


def test_shared_mid_basis_removes_one_shortcut_per_block() -> None:
    own, _ = _slice("llama", 0.25, mid_basis="own")
    shared, _ = _slice("llama", 0.25, mid_basis="shared")
    assert all(own.config.attn_shortcuts) and not any(shared.config.attn_shortcuts)
    assert _params(own) - _params(shared) == 2 * 24 * 24


def test_auto_mid_basis_shares_only_where_it_is_smaller_and_holds_the_signal() -> None:
    # hidden 32 -> 28 at 12.5%: two 28x28 shortcuts outweigh what slicing saves, so the plan shares the basis.
    # On a model whose residual stream has rank 12, the shared basis holds the attention output entirely, so
    # every block keeps it, and the slice stays exact.
    dense = make_low_rank_llama(rank=12)
    reference = dense(INPUTS).logits
    light = hf_slicegpt.slice_model(dense, calibration(), 0.125, round_to=4, show_progress=False)
    assert not any(light.config.attn_shortcuts)
    assert (light(INPUTS).logits - reference).abs().max().item() < 1e-4
    heavy, _ = _slice("llama", 0.5)
    assert all(heavy.config.attn_shortcuts)


def test_auto_mid_basis_gives_a_block_its_own_basis_where_sharing_would_lose_the_attention_output() -> None:
    # The first block's attention writes 8 directions its input (the embedding) never uses: a shared mid basis
    # (the input's principal subspace plus arbitrary null directions) projects part of them away for good,
    # while the block's own basis holds all 16 live directions. "auto" must notice and stay exact.
    dense = make_low_rank_llama(rank=8, attention_rank=8)
    reference = dense(INPUTS).logits
    shared = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration(), 0.125, round_to=4, mid_basis="shared", show_progress=False
    )
    auto = hf_slicegpt.slice_model(dense, calibration(), 0.125, round_to=4, show_progress=False)
    assert auto.config.attn_shortcuts == [True, False, False, False]
    assert (auto(INPUTS).logits - reference).abs().max().item() < 1e-4
    assert (shared(INPUTS).logits - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rotation="diagonal"), "rotation must be one of"),
        (dict(schedule="magic"), "schedule must be one of"),
        (dict(rotation="global", schedule="variance"), "schedule='const'"),
        (dict(rotation="global", slice_head=False), "slice_head"),
        (dict(vocab_prior=-1.0), "vocab_prior"),
    ],
)
def test_bad_mode_options_name_the_problem(kwargs, message) -> None:
    with pytest.raises(SlicingError, match=message):
        _slice("llama", 0.25, **kwargs)


RMS_FAMILIES = [f for f in FAMILIES if get_adapter(make_tiny(f).config).norm == "rms"]
# Phi-3's config derives the head size from hidden_size and validates its longrope factors against it, so it
# cannot describe a narrower residual stream with the original heads.
NOT_NATIVE = {"phi3"}


def test_phi3_native_export_is_refused_with_the_reason() -> None:
    sliced, _ = _slice("phi3", 0.25, rotation="global")
    with pytest.raises(NativeExportError, match="cannot describe hidden_size"):
        to_native(sliced)


@pytest.mark.parametrize("family", [f for f in RMS_FAMILIES if f not in NOT_NATIVE])
def test_native_export_equals_the_global_model(family: str) -> None:
    sliced, _ = _slice(family, 0.25, rotation="global")
    native = to_native(sliced)
    assert native.config.model_type == sliced.config.family_config.model_type
    assert native.config.hidden_size == sliced.config.embedding_dim
    assert (native(INPUTS).logits - sliced(INPUTS).logits).abs().max().item() < 1e-4


def test_native_export_refuses_layernorm_and_per_layer_models() -> None:
    opt, _ = _slice("opt", 0.25, rotation="global")
    with pytest.raises(NativeExportError, match="LayerNorm"):
        to_native(opt)
    layer, _ = _slice("llama", 0.25)
    with pytest.raises(NativeExportError, match="rotation='global'"):
        to_native(layer)


def test_native_checkpoint_loads_without_the_plugin(tmp_path) -> None:
    """In a process that cannot import hf_slicegpt: plain transformers, no remote code, same logits."""
    models = {}
    for family in ("llama", "llama_tied"):
        sliced, _ = _slice(family, 0.25, rotation="global")
        save_native(sliced, tmp_path / family)
        models[family] = sliced(INPUTS).logits.detach()
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert "auto_map" not in config and config["model_type"] == "llama"
    save_file({"inputs": INPUTS, **models}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_slicegpt"] = None
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        for family in ("llama", "llama_tied"):
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family, trust_remote_code=False)
            assert type(model).__name__ == "LlamaForCausalLM", type(model)
            diff = (model(expected["inputs"]).logits - expected[family]).abs().max().item()
            assert diff < 1e-5, (family, diff)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
    assert load_file(tmp_path / "expected.safetensors")["inputs"].shape == INPUTS.shape


def test_vocab_prior_is_exact_at_zero_and_changes_the_first_basis() -> None:
    dense = make_tiny("llama")
    plain = hf_slicegpt.slice_model(copy.deepcopy(dense), calibration(), 0.25, show_progress=False)
    prior = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration(), 0.25, vocab_prior=1.0, show_progress=False
    )
    exact = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration(), 0.0, vocab_prior=1.0, show_progress=False
    )
    assert (exact(INPUTS).logits - dense(INPUTS).logits).abs().max().item() < 1e-4
    assert not torch.allclose(plain.model.embed_tokens.weight, prior.model.embed_tokens.weight)
    assert prior.config.slicing["vocab_prior"] == 1.0


def test_self_generated_calibration_is_seeded() -> None:
    from hf_slicegpt.workflows.augment import self_generated_tokens

    model = make_tiny("llama")
    first = self_generated_tokens(model, None, 3, 10, seed=3, batch_size=2, show_progress=False)
    again = self_generated_tokens(model, None, 3, 10, seed=3, batch_size=2, show_progress=False)
    other = self_generated_tokens(model, None, 3, 10, seed=4, batch_size=2, show_progress=False)
    assert first.shape == (3, 10) and torch.equal(first, again) and not torch.equal(first, other)


def test_cli_native_export_with_self_augmented_calibration(tmp_path, capsys) -> None:
    """`slice --rotation global --export native --calibration-augment self:2` writes a plain Llama checkpoint."""
    from cli_helpers import save_tiny_checkpoint, write_corpus

    from hf_slicegpt.cli import main

    dense = save_tiny_checkpoint(tmp_path / "dense")
    corpus = write_corpus(tmp_path / "corpus.txt")
    common = ["slice", str(dense), "--sparsity", "0.25", "--calibration", str(corpus), "--num-samples", "4"]
    common += ["--seq-len", "32", "--quiet"]
    code = main(
        [*common, "--output", str(tmp_path / "native"), "--rotation", "global", "--export", "native"]
        + ["--calibration-augment", "self:2"]
    )
    assert code == 0
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["hidden_size"] == 24
    report = json.loads((tmp_path / "native" / "slicing_report.json").read_text())
    assert report["export"]["architecture"] == "LlamaForCausalLM"
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "native")).__name__ == "LlamaForCausalLM"

    capsys.readouterr()
    code = main([*common, "--output", str(tmp_path / "refused"), "--export", "native"])
    assert code != 0
    assert "--rotation global" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
