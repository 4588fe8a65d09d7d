"""The public extension points of the layer loop (``SlicingHooks``) and its explicit layer source."""

from __future__ import annotations

import copy

import torch
from tiny import calibration, make_low_rank_llama, make_tiny

import hf_slicegpt
from hf_slicegpt import SlicingHooks
from hf_slicegpt.slicing import InMemoryLayers


def test_the_covariance_and_basis_hooks_see_every_signal_in_order() -> None:
    seen_cov, seen_basis = [], []

    def covariance(name, cov, signals, masks):
        seen_cov.append((name, len(signals), len(masks)))
        return cov

    def basis(name, values, vectors, width):
        seen_basis.append(name)
        return vectors[:, :width]

    dense = make_tiny("llama")
    plain = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration(), 0.25, batch_size=4, show_progress=False
    )
    hooked = hf_slicegpt.slice_model(
        dense,
        calibration(),
        0.25,
        batch_size=4,
        show_progress=False,
        hooks=SlicingHooks(covariance=covariance, basis=basis),
    )
    names = [
        "embeddings",
        "layer 0 attention output",
        "layer 0 output",
        "layer 1 attention output",
        "layer 1 output",
    ]
    assert [n for n, _, _ in seen_cov] == names and seen_basis == names
    assert all(batches == masks == 2 for _, batches, masks in seen_cov)
    # identity hooks change nothing
    for key, value in plain.state_dict().items():
        assert torch.equal(value, hooked.state_dict()[key]), key


def test_a_basis_hook_changes_the_model_and_a_plan_hook_its_widths() -> None:
    def reversed_basis(name, values, vectors, width):
        return vectors.flip(1)[:, :width]  # the least important directions: must hurt

    def wider(plan):
        plan.outputs = [w + 4 for w in plan.outputs]
        return plan

    dense = make_low_rank_llama(rank=12)  # 16 of 32 directions hold the whole signal: PCA at 50% is exact
    ids = calibration(4, 16, seed=9)
    reference = dense(ids).logits
    good = hf_slicegpt.slice_model(copy.deepcopy(dense), calibration(), 0.5, round_to=4, show_progress=False)
    bad = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration(), 0.5, round_to=4, show_progress=False,
        hooks=SlicingHooks(basis=reversed_basis),
    )  # fmt: skip
    error = {k: (m(ids).logits - reference).pow(2).mean().item() for k, m in (("good", good), ("bad", bad))}
    assert error["good"] < 1e-8 and error["bad"] > 1e-3
    widened = hf_slicegpt.slice_model(
        dense, calibration(), 0.5, round_to=4, show_progress=False, hooks=SlicingHooks(plan=wider)
    )
    assert widened.config.attn_input_dims == [16, 20, 20, 20]


def test_an_explicit_in_memory_source_gives_the_same_model() -> None:
    dense = make_tiny("opt")
    plain = hf_slicegpt.slice_model(copy.deepcopy(dense), calibration(), 0.25, show_progress=False)
    source = InMemoryLayers(dense.model.decoder.layers, torch.device("cpu"))
    explicit = hf_slicegpt.slice_model(dense, calibration(), 0.25, show_progress=False, source=source)
    assert all(isinstance(layer, torch.nn.Identity) for layer in source.layers)  # consumed block by block
    for key, value in plain.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[key]), key
