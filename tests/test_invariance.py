"""Computational invariance helpers: norm folding, mean baking, and the weightless RMSNorm they lead to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_slicegpt.modeling.modeling_sliced import SlicedRMSNorm
from hf_slicegpt.slicing.rotate import center_rows, center_writer, fold_norm, norm_parameters

D = 16
# SlicedRMSNorm computes in float32 (as transformers' norms do), whatever its input dtype.
NORM_ATOL = 1e-6


def _x(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 0.5


def _linear(d_in: int = D, d_out: int = 10, bias: bool = True, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)


def _orthogonal(seed: int = 2) -> torch.Tensor:
    return torch.linalg.qr(
        torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )[0]


def _layer_norm() -> nn.LayerNorm:
    norm = nn.LayerNorm(D, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(D, dtype=torch.float64))
        norm.bias.copy_(0.2 * torch.randn(D, dtype=torch.float64))
    return norm


@pytest.mark.parametrize("reader_bias", [True, False])
def test_fold_layer_norm_affine_into_reader(reader_bias: bool) -> None:
    """linear(LN(x) * g + b) == folded linear(LN_without_affine(x))."""
    norm, reader = _layer_norm(), _linear(bias=reader_bias)
    scale, shift = norm_parameters(norm, D)
    weight, bias = fold_norm(
        reader.weight.detach(), None if reader.bias is None else reader.bias.detach(), scale, shift
    )
    x = _x()
    plain = nn.functional.layer_norm(x, (D,), eps=1e-5)
    expected = reader(norm(x))
    assert torch.allclose(plain @ weight.T + bias, expected, atol=1e-12)


def test_fold_rms_norm_scale() -> None:
    norm = nn.RMSNorm(D, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(D, dtype=torch.float64))
    reader = _linear(bias=False)
    scale, shift = norm_parameters(norm, D)
    assert shift is None
    weight, bias = fold_norm(reader.weight.detach(), None, scale, shift)
    assert bias is None
    x = _x()
    weightless = SlicedRMSNorm(D, 1e-6)
    assert torch.allclose(weightless(x) @ weight.T, reader(norm(x)), atol=NORM_ATOL)


def test_norm_parameters_defaults_and_offset() -> None:
    class NoWeight(nn.Module):
        pass

    scale, shift = norm_parameters(NoWeight(), 5)
    assert torch.equal(scale, torch.ones(5, dtype=torch.float64)) and shift is None
    norm = nn.RMSNorm(4, dtype=torch.float32)
    with torch.no_grad():
        norm.weight.fill_(0.25)
    scale, _ = norm_parameters(norm, 4, weight_offset=1.0)  # Gemma multiplies by (1 + w)
    assert scale.dtype == torch.float64 and torch.allclose(scale, torch.full((4,), 1.25, dtype=torch.float64))


def test_center_writer_outputs_are_mean_free() -> None:
    writer = _linear(d_in=12, d_out=D)
    weight, bias = center_writer(writer.weight.detach(), writer.bias.detach())
    y = torch.randn(30, 12, dtype=torch.float64) @ weight.T + bias
    assert torch.allclose(y.mean(-1), torch.zeros(30, dtype=torch.float64), atol=1e-12)
    # Centring subtracts each output's mean, and nothing else.
    inputs = torch.randn(3, 12, dtype=torch.float64)
    original = writer(inputs)
    assert torch.allclose(inputs @ weight.T + bias, original - original.mean(-1, keepdim=True), atol=1e-12)
    assert center_writer(writer.weight.detach(), None)[1] is None


def test_layer_norm_equals_rms_norm_on_a_mean_free_stream() -> None:
    """Why mean baking works: once every writer is centred, LayerNorm's mean subtraction is a no-op."""
    table = _x(50)
    centred = center_rows(table)
    assert torch.allclose(centred.mean(-1), torch.zeros(50, dtype=torch.float64), atol=1e-12)
    layer_norm = nn.functional.layer_norm(table, (D,), eps=1e-5)
    assert torch.allclose(nn.functional.layer_norm(centred, (D,), eps=1e-5), layer_norm, atol=1e-12)
    assert torch.allclose(SlicedRMSNorm(D, 1e-5)(centred), layer_norm, atol=NORM_ATOL)
    # And the sum of centred writers stays centred: the residual stream is mean-free end to end.
    writer = _linear(d_in=7, d_out=D)
    w, b = center_writer(writer.weight.detach(), writer.bias.detach())
    stream = centred[:10] + torch.randn(10, 7, dtype=torch.float64) @ w.T + b
    assert torch.allclose(
        SlicedRMSNorm(D, 1e-5)(stream), nn.functional.layer_norm(stream, (D,), eps=1e-5), atol=NORM_ATOL
    )


def test_weightless_rms_norm_commutes_with_rotations() -> None:
    """N(x Q) == N(x) Q for orthogonal Q: the invariance SliceGPT rests on."""
    norm, q, x = SlicedRMSNorm(D, 1e-6), _orthogonal(), _x()
    assert torch.allclose(norm(x @ q), norm(x) @ q, atol=NORM_ATOL)


def test_divisor_stays_the_original_width_after_slicing() -> None:
    """On a stream that lives in the kept directions, the sliced norm with divisor D equals the dense one."""
    q, d = _orthogonal(), 12
    kept = q[:, :d]
    x = _x() @ kept @ kept.T  # no energy outside the kept directions
    dense = SlicedRMSNorm(D, 1e-6)(x)
    sliced = SlicedRMSNorm(D, 1e-6)(x @ kept)
    assert torch.allclose(sliced, dense @ kept, atol=NORM_ATOL)
    wrong = SlicedRMSNorm(d, 1e-6)(x @ kept)  # the sliced width as divisor would rescale every token
    assert not torch.allclose(wrong, dense @ kept, atol=1e-3)


def test_rotating_readers_and_writers_keeps_the_function() -> None:
    """writer -> norm -> reader with W_writer Q and Q^T W_reader computes the same thing."""
    q = _orthogonal()
    writer, reader, x = _linear(d_in=6, d_out=D), _linear(), torch.randn(9, 6, dtype=torch.float64)
    norm = SlicedRMSNorm(D, 1e-6)
    expected = reader(norm(writer(x)))
    w_rot, b_rot = q.T @ writer.weight.detach(), q.T @ writer.bias.detach()  # nn.Linear layout: (out, in)
    r_rot = reader.weight.detach() @ q
    got = norm(x @ w_rot.T + b_rot) @ r_rot.T + reader.bias.detach()
    assert torch.allclose(got, expected, atol=NORM_ATOL)


def test_rms_norm_keeps_input_dtype() -> None:
    norm = SlicedRMSNorm(D, 1e-6)
    x = torch.randn(3, D, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    assert "divisor=16" in repr(norm)
