"""Family adapters: chosen from the config, and every path they declare really exists with the right shapes.

An adapter is data: if one of its dotted paths is wrong, slicing would fail (or worse, rotate the wrong matrix).
These tests walk every declared path on every tiny family.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import FAMILIES, make_tiny
from torch import nn
from transformers import LlamaConfig, OPTConfig, PhiConfig

from hf_slicegpt import (
    FamilyAdapter,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from hf_slicegpt.adapters import refuse_model_type, registered_adapters

EXPECTED_NAME = {"llama": "llama", "llama_tied": "llama", "opt": "opt", "phi": "phi"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request) -> tuple[str, nn.Module, FamilyAdapter]:
    model = make_tiny(request.param)
    return request.param, model, get_adapter(model.config)


def test_core_families_pick_their_adapter() -> None:
    for family, name in EXPECTED_NAME.items():
        adapter = get_adapter(make_tiny(family).config)
        assert adapter.name == name
    assert get_adapter(make_tiny("opt").config).norm == "layer"
    assert get_adapter(make_tiny("phi").config).topology == "parallel"
    assert get_adapter(make_tiny("llama").config).norm == "rms"


def test_family_comes_from_the_config_not_the_name() -> None:
    config = LlamaConfig(num_hidden_layers=1)
    config._name_or_path = "facebook/opt-125m"  # a misleading hub name must not matter
    assert get_adapter(config).name == "llama"
    config = PhiConfig(num_hidden_layers=1)
    config._name_or_path = "meta-llama/Llama-2-7b-hf"
    assert get_adapter(config).name == "phi"


def test_model_level_paths(family_model) -> None:
    family, model, adapter = family_model
    hidden = model.config.hidden_size
    embed = model.get_submodule(adapter.embed_tokens)
    assert isinstance(embed, nn.Embedding) and embed.embedding_dim == hidden
    assert embed is model.get_input_embeddings()
    head = model.get_submodule(adapter.lm_head)
    assert isinstance(head, nn.Linear) and head.in_features == hidden
    assert head is model.get_output_embeddings()
    final_norm = model.get_submodule(adapter.final_norm)
    assert final_norm.weight.shape == (hidden,)
    layers = model.get_submodule(adapter.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.config.num_hidden_layers
    if adapter.embed_positions is not None:
        assert model.get_submodule(adapter.embed_positions).embedding_dim == hidden
    if adapter.rotary_emb is not None:
        assert hasattr(model.get_submodule(adapter.rotary_emb), "inv_freq")


def test_block_level_paths_read_and_write_the_residual_stream(family_model) -> None:
    """Readers take the hidden size in, writers give it out: exactly the sides that slicing rotates."""
    family, model, adapter = family_model
    hidden = model.config.hidden_size
    for layer in model.get_submodule(adapter.layers):
        norms = [adapter.attn_norm] + ([adapter.mlp_norm] if adapter.mlp_norm else [])
        for name in norms:
            assert layer.get_submodule(name).weight.shape == (hidden,), name
        attn = layer.get_submodule(adapter.attention)
        for name in adapter.attn_inputs:
            assert attn.get_submodule(name).in_features == hidden, name
        assert attn.get_submodule(adapter.attn_output).out_features == hidden
        mlp_owner = layer if adapter.mlp is None else layer.get_submodule(adapter.mlp)
        for name in adapter.mlp_inputs:
            assert mlp_owner.get_submodule(name).in_features == hidden, name
        assert mlp_owner.get_submodule(adapter.mlp_output).out_features == hidden
        if adapter.mlp is None:
            assert adapter.mlp_activation_attr and getattr(model.config, adapter.mlp_activation_attr)
        # The epsilon the sliced norms will use (config attribute, else torch's LayerNorm default) is the one the
        # family's norms really use.
        eps = getattr(model.config, adapter.norm_eps_attr, None) or 1e-5
        norm = layer.get_submodule(adapter.attn_norm)
        actual = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
        assert actual == pytest.approx(eps), f"{family}: norm eps {actual} != {eps}"


def test_every_hidden_sized_linear_is_covered(family_model) -> None:
    """No linear that touches the residual stream is forgotten by the spec (it would not be rotated)."""
    family, model, adapter = family_model
    hidden = model.config.hidden_size
    layer = model.get_submodule(adapter.layers)[0]
    attn_prefix = adapter.attention + "."
    mlp_prefix = "" if adapter.mlp is None else adapter.mlp + "."
    declared = {attn_prefix + n for n in (*adapter.attn_inputs, adapter.attn_output)}
    declared |= {mlp_prefix + n for n in (*adapter.mlp_inputs, adapter.mlp_output)}
    touching = {
        name
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and hidden in (module.in_features, module.out_features)
    }
    # A linear of the head dimension can equal the hidden size by accident (q/k norms are not linears).
    assert touching <= declared, f"{family}: undeclared residual linears {sorted(touching - declared)}"


def test_register_adapter_refuses_a_taken_model_type() -> None:
    llama = get_adapter(LlamaConfig(num_hidden_layers=1))
    clone = dataclasses.replace(llama, name="my-llama")
    with pytest.raises(ValueError, match="'llama' already has the adapter 'llama'"):
        register_adapter(clone)
    assert register_adapter(llama) is llama  # re-registering the same adapter is harmless
    with pytest.raises(ValueError, match="has the adapter"):
        refuse_model_type("llama", "because")


def test_registry_lists() -> None:
    types = supported_model_types()
    assert types == sorted(types)
    assert {"llama", "mistral", "opt", "phi"} <= set(types)
    names = [adapter.name for adapter in registered_adapters()]
    assert len(names) == len(set(names))


def test_adapters_are_immutable() -> None:
    adapter = get_adapter(OPTConfig(num_hidden_layers=1, word_embed_proj_dim=768))
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.name = "changed"


def test_unsupported_error_is_a_value_error() -> None:
    assert issubclass(UnsupportedModelError, ValueError)
    config = LlamaConfig(num_hidden_layers=1)
    config.model_type = "my_new_arch"
    config.architectures = ["MyNewArchForCausalLM"]
    with pytest.raises(ValueError, match="'my_new_arch'.*MyNewArchForCausalLM.*llama"):
        get_adapter(config)


def test_refusal_happens_before_the_model_is_touched() -> None:
    model = make_tiny("opt", do_layer_norm_before=False)
    before = {name: p.clone() for name, p in model.named_parameters()}
    from tiny import calibration

    from hf_slicegpt import slice_model

    with pytest.raises(UnsupportedModelError, match="post-LayerNorm"):
        slice_model(model, calibration(), 0.25, show_progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
