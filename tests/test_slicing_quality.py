"""Slicing quality on a tiny LLaMA whose activations have a known structure, through the public API only.

The model's residual stream lives near a known 16-dimensional subspace: the embedding table is rank 8 (subspace
A) plus small noise, every attention block writes into A, and every MLP writes strongly into another 8
directions B, orthogonal to A. So a block's MLP input (A) and its output (A + B) span different subspaces, and a
slice to width 16 keeps every signal almost whole, but only if each basis comes from its own signal's covariance.

Per signal, the sliced model's residual stream (read with forward hooks) is compared with the dense model's:

- the best isometric reconstruction of the dense signal from the sliced one must lose far less than a random
  orthogonal basis of the same width would (PCA ~1e-3 of the energy, random ~0.75);
- ``sliced.slicing_stats`` must describe what the sliced model computes: the kept eigenvalues sum to the
  sliced signal's energy, all of them to the dense signal's, and the kept fraction equals an independent PCA
  of the dense signal.

A layer-output basis built from the wrong covariance (say the MLP input's) loses most of B and fails both.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from tiny import VOCAB, make_tiny
from torch import nn

import hf_slicegpt

HIDDEN = 64
RANK = 8  # of each of the subspaces A (embeddings, attention) and B (MLPs)
SPARSITY = 0.75  # width 16 = RANK (A) + RANK (B)
MLP_GAIN = 20.0  # the MLPs' writes into B then carry most of a layer output's energy


def structured_llama(layers: int = 2, noise: float = 1e-2, seed: int = 0) -> nn.Module:
    """A tiny LLaMA whose embeddings and attention write into A (rank 8) and whose MLPs write into B."""
    model = make_tiny(
        "llama", seed=seed, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=layers
    )
    generator = torch.Generator().manual_seed(seed + 7)
    basis, _ = torch.linalg.qr(torch.randn(HIDDEN, 2 * RANK, generator=generator))
    onto_a = basis[:, :RANK] @ basis[:, :RANK].T
    onto_b = basis[:, RANK:] @ basis[:, RANK:].T
    with torch.no_grad():
        table = model.model.embed_tokens.weight
        table.copy_(table @ onto_a + noise * table.std() * torch.randn(table.shape, generator=generator))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(onto_a @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(MLP_GAIN * onto_b @ layer.mlp.down_proj.weight)
    return model


def residual_signals(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every residual-stream signal SliceGPT computes a basis for, as (tokens, width) float64 matrices.

    Named as in ``slicing_stats``: the embeddings (the first block's input), each block's MLP input
    ("attention output": the input of its post-attention norm) and each block's output. The same hooks read a
    dense LLaMA and a sliced model, whose blocks keep these module names.
    """
    found: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        found[name] = x.detach().reshape(-1, x.shape[-1]).double()

    def before(name: str):
        def hook(module, args, kwargs):
            keep(name, args[0] if args else kwargs["hidden_states"])

        return hook

    def after(name: str):
        def hook(module, args, kwargs, output):
            keep(name, output[0] if isinstance(output, tuple) else output)

        return hook

    if hasattr(model, "set_fused_inference"):
        # The fused inference path runs the readers and the shortcut as one GEMM and never calls the norm
        # module that the hooks below watch; the plain path computes the same signals (tests/test_fused_inference).
        model.set_fused_inference(False)
    layers = model.model.layers
    hooks = [layers[0].register_forward_pre_hook(before("embeddings"), with_kwargs=True)]
    for idx, layer in enumerate(layers):
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                before(f"layer {idx} attention output"), with_kwargs=True
            )
        )
        hooks.append(layer.register_forward_hook(after(f"layer {idx} output"), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def lost_energy(dense: torch.Tensor, sliced: torch.Tensor) -> float:
    """The share of the dense signal's energy that the sliced signal does not carry.

    SliceGPT's sliced signal is ``dense @ Q`` for the kept orthonormal basis ``Q``; for such a projection this is
    exactly the reconstruction error ``||dense - dense Q Q^T||^2 / ||dense||^2``.
    """
    return float(1 - sliced.pow(2).sum() / dense.pow(2).sum())


def isometric_error(dense: torch.Tensor, sliced: torch.Tensor) -> float:
    """min over Q with orthonormal columns of ||dense - sliced Q^T||^2 / ||dense||^2.

    Small only if the sliced signal is (close to) an orthogonal projection of the dense one, whatever its basis:
    it rules out a sliced signal that carries the energy but not the content. Closed form: the best ``Q``
    maximises ``trace(Q^T dense^T sliced)``, whose maximum is the nuclear norm of ``dense^T sliced``.
    """
    cross = torch.linalg.matrix_norm(dense.T @ sliced, ord="nuc")
    total = dense.pow(2).sum()
    return float((total + sliced.pow(2).sum() - 2 * cross) / total)


def random_basis(width: int, seed: int = 5) -> torch.Tensor:
    """A random orthonormal ``(HIDDEN, width)`` basis: what PCA must beat."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(HIDDEN, width, dtype=torch.float64, generator=generator))
    return q


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibration_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def dense_and_sliced(calibration_ids: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dense = structured_llama()
    sliced = hf_slicegpt.slice_model(
        copy.deepcopy(dense), calibration_ids, SPARSITY, rotation="layer", show_progress=False
    )
    torch.set_num_threads(threads)
    return dense, sliced


def test_the_structure_is_as_designed(dense_and_sliced, calibration_ids) -> None:
    """The premise: the MLP input and the layer output really span different subspaces (else nothing is tested)."""
    dense, sliced = dense_and_sliced
    signals = residual_signals(dense, calibration_ids)
    for idx in range(2):
        mid, out = signals[f"layer {idx} attention output"], signals[f"layer {idx} output"]
        mid_values = torch.linalg.eigvalsh(mid.T @ mid).flip(0)
        # the MLP input's top 16 directions miss most of the layer output (B is far stronger than A there)
        q_mid = torch.linalg.eigh(mid.T @ mid).eigenvectors.flip(1)[:, : 2 * RANK]
        if idx == 0:
            assert mid_values[RANK:].sum() < 1e-3 * mid_values.sum()  # layer 0's MLP input: A only
            assert lost_energy(out, out @ q_mid) > 0.5
    assert sliced.config.attn_input_dims == [16, 16] and sliced.config.mlp_input_dims == [16, 16]
    names = [s.name for s in sliced.slicing_stats]
    assert names == [
        "embeddings",
        *(f"layer {i} {kind}" for i in range(2) for kind in ("attention output", "output")),
    ]


def test_pca_beats_a_random_rotation_on_every_signal(dense_and_sliced, calibration_ids) -> None:
    dense, sliced = dense_and_sliced
    dense_signals = residual_signals(dense, calibration_ids)
    sliced_signals = residual_signals(sliced, calibration_ids)
    assert dense_signals.keys() == sliced_signals.keys() and len(dense_signals) == 5
    for name, signal in dense_signals.items():
        width = sliced_signals[name].shape[1]
        assert width == 16, name
        pca = lost_energy(signal, sliced_signals[name])
        random = lost_energy(signal, signal @ random_basis(width))
        assert random > 0.5, (name, random)  # 16 of 64 random directions keep about a quarter
        assert pca < 0.01 * random, (
            f"{name}: sliced loses {pca:.3g} of the energy, a random basis {random:.3g}"
        )
        assert isometric_error(signal, sliced_signals[name]) < 0.01 * random, name


def test_slicing_stats_match_the_signals_they_name(dense_and_sliced, calibration_ids) -> None:
    """Each basis comes from its own signal: the recorded spectrum is that signal's, in the dense model too."""
    dense, sliced = dense_and_sliced
    dense_signals = residual_signals(dense, calibration_ids)
    sliced_signals = residual_signals(sliced, calibration_ids)
    for stats in sliced.slicing_stats:
        eigenvalues = torch.tensor(stats.eigenvalues, dtype=torch.float64)
        kept = float(eigenvalues[: stats.kept_width].sum())
        # The sliced model carries exactly the kept principal components of the signal the slicer measured.
        energy = float(sliced_signals[stats.name].pow(2).sum())
        assert energy == pytest.approx(kept, rel=1e-3), stats.name
        # ... and that signal is the dense model's (the earlier layers lose only the noise).
        dense = dense_signals[stats.name]
        assert float(eigenvalues.sum()) == pytest.approx(float(dense.pow(2).sum()), rel=1e-2), stats.name
        independent = torch.linalg.eigvalsh(dense.T @ dense).flip(0)
        fraction = float(independent[: stats.kept_width].sum() / independent.sum())
        assert stats.explained_variance == pytest.approx(fraction, abs=2e-3), stats.name
        top = independent[: stats.kept_width]
        assert torch.allclose(eigenvalues[: stats.kept_width], top, rtol=0.05, atol=1e-3 * float(top[0]))


def test_logits_survive_the_slice(dense_and_sliced, calibration_ids) -> None:
    dense, sliced = dense_and_sliced
    ids = calibration_ids[:4]
    with torch.no_grad():
        expected, got = dense(input_ids=ids).logits, sliced(input_ids=ids).logits
    # only the embedding noise is dropped
    assert torch.linalg.norm(got - expected) < 0.1 * torch.linalg.norm(expected)
