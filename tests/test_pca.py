"""Covariance accumulation (float64, padding masked) and the eigenbasis SliceGPT rotates onto."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_slicegpt.slicing.pca import CHUNK_ROWS, Covariance, NonFiniteSignalError, eigenbasis


def _signal(n: int = 300, width: int = 12, seed: int = 0) -> torch.Tensor:
    """Correlated data with a spread of variances, so the eigenvalues are distinct."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    scales = torch.logspace(1, -2, width, dtype=torch.float64)
    return torch.randn(n, width, generator=generator, dtype=torch.float64) * scales @ mixing


def test_sum_is_x_transpose_x_and_counts_tokens() -> None:
    x = _signal()
    cov = Covariance(x.shape[1])
    cov.add(x[:100].reshape(4, 25, -1))
    cov.add(x[100:])
    assert cov.tokens == 300
    assert cov.sum.dtype == torch.float64
    assert torch.allclose(cov.sum, x.T @ x, rtol=1e-12, atol=0)


def test_padding_is_masked() -> None:
    x = _signal(40).to(torch.float32).reshape(4, 10, -1)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, :3] = 0
    mask[3, :7] = 0
    poisoned = x.clone()
    poisoned[mask == 0] = 1e3  # padding positions carry garbage that must not count
    masked = Covariance(x.shape[-1])
    masked.add(poisoned, mask)
    kept = x[mask.bool()]
    reference = Covariance(x.shape[-1])
    reference.add(kept)
    assert masked.tokens == int(mask.sum()) == kept.shape[0]
    assert torch.allclose(masked.sum, reference.sum, rtol=1e-12, atol=0)


def test_fully_padded_batch_adds_nothing() -> None:
    cov = Covariance(4)
    cov.add(torch.randn(2, 3, 4), torch.zeros(2, 3))
    assert cov.tokens == 0 and not cov.sum.any()
    with pytest.raises(ValueError, match="no calibration tokens reached"):
        eigenbasis(cov)


def test_mixed_precision_matches_float64() -> None:
    x = _signal(3 * CHUNK_ROWS + 17, width=16).to(torch.float32)
    mixed, exact = Covariance(16, precision="mixed"), Covariance(16, precision="float64")
    mixed.add(x)
    exact.add(x)
    assert torch.allclose(mixed.sum, exact.sum, rtol=1e-5, atol=1e-6 * exact.sum.abs().max().item())


def test_float32_overflow_is_redone_in_float64() -> None:
    """Squares of 1e20 overflow float32 but are finite in float64: no error, the right sum."""
    x = torch.full((3, 2), 1e20, dtype=torch.float32)
    cov = Covariance(2)
    cov.add(x)
    assert torch.isfinite(cov.sum).all()
    assert torch.allclose(cov.sum, x.double().T @ x.double())


@pytest.mark.parametrize("precision", ["mixed", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_signal_names_the_signal(precision: str, bad: float) -> None:
    x = torch.randn(5, 4)
    x[2, 1] = bad
    cov = Covariance(4, name="layer 7 attention output", precision=precision)
    with pytest.raises(NonFiniteSignalError, match="layer 7 attention output"):
        cov.add(x)
    assert issubclass(NonFiniteSignalError, ValueError)


def test_non_finite_sum_is_refused_by_eigenbasis() -> None:
    cov = Covariance(3, name="layer 2 output")
    cov.sum[0, 0] = float("nan")
    cov.tokens = 10
    with pytest.raises(NonFiniteSignalError, match="layer 2 output"):
        eigenbasis(cov)


def test_bad_precision() -> None:
    with pytest.raises(ValueError, match="'float16'"):
        Covariance(3, precision="float16")


def test_eigenbasis_descending_orthonormal_and_exact() -> None:
    x = _signal()
    cov = Covariance(x.shape[1])
    cov.add(x)
    values, vectors = eigenbasis(cov)
    assert values.dtype == vectors.dtype == torch.float64
    assert torch.all(values[:-1] >= values[1:])
    assert values[0] > 10 * values[-1]
    assert torch.allclose(vectors.T @ vectors, torch.eye(12, dtype=torch.float64), atol=1e-10)
    # The damping added for stability is taken back out: the eigenvalues are those of X^T X.
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, cov.sum, rtol=0, atol=1e-8 * values[0])
    expected = torch.linalg.eigvalsh(x.T @ x).flip(0)
    assert torch.allclose(values, expected, rtol=1e-8, atol=1e-8 * values[0])


def test_eigenvector_signs_are_fixed() -> None:
    """Largest entry of every eigenvector positive, so the same data always gives the same basis."""
    x = _signal()
    first, second = Covariance(12), Covariance(12)
    first.add(x)
    second.add(-x)  # the same covariance
    v1, v2 = eigenbasis(first)[1], eigenbasis(second)[1]
    assert torch.equal(v1, v2)
    largest = v1.gather(0, v1.abs().argmax(dim=0, keepdim=True))
    assert torch.all(largest > 0)


def test_top_direction_is_the_dominant_one() -> None:
    generator = torch.Generator().manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64, generator=generator), dim=0)
    x = 10 * torch.randn(500, 1, dtype=torch.float64, generator=generator) * direction
    x = x + 0.1 * torch.randn(500, 8, dtype=torch.float64, generator=generator)
    cov = Covariance(8)
    cov.add(x)
    top = eigenbasis(cov)[1][:, 0]
    assert abs(float(top @ direction)) > 0.999


def test_rank_deficient_covariance_warns_and_stays_finite(caplog: pytest.LogCaptureFixture) -> None:
    cov = Covariance(16, name="embeddings")
    cov.add(torch.randn(5, 16))
    with caplog.at_level(logging.WARNING, logger="hf_slicegpt.slicing.pca"):
        values, vectors = eigenbasis(cov)
    assert "embeddings" in caplog.text and "rank-deficient" in caplog.text
    assert torch.isfinite(vectors).all() and torch.all(values >= 0)
    assert torch.allclose(vectors.T @ vectors, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert (values > 1e-5 * values[0]).sum() == 5  # five tokens span five directions (float32 products)


def test_enough_tokens_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    cov = Covariance(4)
    cov.add(torch.randn(50, 4))
    with caplog.at_level(logging.WARNING, logger="hf_slicegpt.slicing.pca"):
        eigenbasis(cov)
    assert "rank-deficient" not in caplog.text


def test_all_reduce_without_distributed_is_a_no_op() -> None:
    cov = Covariance(3)
    cov.add(torch.ones(2, 3))
    before = cov.sum.clone()
    cov.all_reduce()
    cov.all_reduce()
    assert torch.equal(cov.sum, before) and cov.tokens == 2


def test_a_frame_gives_the_eigenbasis_in_the_streams_coordinates() -> None:
    """Signals summed as ``y = x F`` decompose to the eigenvectors of ``x``'s own sum, signs fixed the same way."""
    x = _signal()
    frame = torch.linalg.qr(
        torch.randn(12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    )[0]
    plain, framed = Covariance(12), Covariance(12, frame=frame)
    plain.add(x)
    framed.add(x @ frame)
    values, vectors = eigenbasis(plain)
    framed_values, framed_vectors = eigenbasis(framed)
    assert torch.allclose(framed_values, values, rtol=0, atol=1e-12 * float(values[0]))
    assert torch.allclose(framed_vectors, vectors, rtol=0, atol=1e-8)
