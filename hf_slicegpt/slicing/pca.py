"""Covariance accumulation in float64 and the eigenbasis SliceGPT rotates onto."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from ..errors import SliceGPTError

logger = logging.getLogger(__name__)


class NonFiniteSignalError(SliceGPTError):
    """A calibration signal holds NaN or Inf, so no basis can be computed from it."""


# Rows per float32 product in the "mixed" accumulation: each chunk's ``X^T X`` rounds like a float32 sum of this
# many terms (relative error ~ sqrt(rows) * 6e-8, a few 1e-6), and the chunks are summed in float64.
CHUNK_ROWS = 1024
PRECISIONS = ("mixed", "float64")


class Covariance:
    """Running ``sum X^T X`` over the unpadded tokens of a signal, accumulated in float64.

    ``precision="float64"`` converts every signal to float64 before the product (the paper's recipe).
    ``"mixed"`` multiplies chunks of :data:`CHUNK_ROWS` rows in the signal's float32 and sums the chunk
    products in float64: about twice as fast on a CPU, no float64 copy of the signal, and the same sliced
    model (see BENCHMARKS.md, "Performance"). The eigendecomposition stays float64 either way. A chunk whose
    float32 product overflows is redone in float64, so the two agree on what counts as non-finite. The mixed
    path also uses the symmetry: it multiplies the three blocks ``A^T A``, ``A^T B``, ``B^T B`` of the column
    halves ``[A B]`` (3/4 of the work) and mirrors ``B^T A`` when :attr:`sum` is read.

    With a ``frame`` (an orthogonal ``(width, width)`` float64 matrix ``F``), the signals added are ``y = x F``
    for the stream's ``x``: :attr:`sum` is then ``F^T (sum X^T X) F``, and :func:`eigenbasis` returns
    eigenvectors in the stream's coordinates. The loop sums a residual in the frame of its input basis, which
    spares expanding the sliced input to full width (see :func:`~hf_slicegpt.slicing.signals.signal_frame`).
    """

    def __init__(
        self,
        width: int,
        device: torch.device | str = "cpu",
        name: str = "signal",
        precision: str = "mixed",
        frame: torch.Tensor | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"covariance precision must be one of {PRECISIONS}, got {precision!r}")
        self.width = width
        self.name = name
        self.precision = precision
        self.frame = frame
        self._sum = torch.zeros(width, width, dtype=torch.float64, device=device)
        self._split = width // 2
        self._mirror = False  # the lower-left block is stale until the next read of ``sum``
        self.tokens = 0
        self.reduced = False

    @property
    def sum(self) -> torch.Tensor:
        """The full symmetric ``sum X^T X`` (float64)."""
        if self._mirror:
            h = self._split
            self._sum[h:, :h] = self._sum[:h, h:].T
            self._mirror = False
        return self._sum

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:
        self._sum = value
        self._mirror = False

    def add(self, signal: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch ``(..., width)``; ``mask`` (``(...)``, 1 = real token) drops padding."""
        x = signal.reshape(-1, signal.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(device=x.device, dtype=torch.bool)]
        if x.numel() == 0:
            return
        x = x.to(self._sum.device)
        if self.precision == "float64" or x.dtype == torch.float64 or reduced_float32(x.device):
            self._add64(x)
        else:
            x = x.to(torch.float32)  # bf16/fp16 signals: products in float32, never in the half dtype
            h = self._split
            for start in range(0, x.shape[0], CHUNK_ROWS):
                chunk = x[start : start + CHUNK_ROWS]
                a, b = chunk[:, :h], chunk[:, h:]
                aa, ab, bb = a.T @ a, a.T @ b, b.T @ b
                # Finite diagonals mean finite inputs and finite products (|p_ij| <= sqrt(p_ii p_jj));
                # otherwise redo the chunk in float64, which raises on NaN/Inf in the signal and absorbs a mere
                # float32 overflow of the squares.
                if torch.isfinite(aa.diagonal()).all() and torch.isfinite(bb.diagonal()).all():
                    self._sum[:h, :h] += aa
                    self._sum[:h, h:] += ab
                    self._sum[h:, h:] += bb
                    self._mirror = True
                else:
                    self._add64(chunk)
        self.tokens += x.shape[0]

    def _add64(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        if not torch.isfinite(x).all():
            raise NonFiniteSignalError(
                f"the calibration signal {self.name} holds NaN or Inf values (an overflow in the model dtype?); "
                "slice with --dtype float32 or bfloat16"
            )
        self.sum.addmm_(x.T, x)

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks, when ``torch.distributed`` is initialised; a second call is a no-op.

        Rank 0's sum is then broadcast, so that every rank decomposes bit-identical matrices and derives the
        same basis (a reduction need not round identically everywhere).
        """
        from ..runtime import distributed

        if self.reduced or distributed.world_size() == 1:
            self.reduced = True
            return
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.sum.device)
        distributed.all_reduce_sum_(self.sum)
        distributed.all_reduce_sum_(tokens)
        distributed.broadcast_(self.sum)
        self.tokens = int(tokens.item())
        self.reduced = True


def reduced_float32(device: torch.device) -> bool:
    """Whether float32 matmuls may run in TF32 here (then the mixed path would lose its precision)."""
    return device.type == "cuda" and (
        torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    )


def eigh_threads(width: int) -> int:
    """Threads for one ``width x width`` eigendecomposition: about one per 1024 columns.

    LAPACK's symmetric eigensolver synchronises its threads many times per call; on a small matrix the
    waits outweigh the work, badly so on a shared machine (measured for width 576 on 2 busy cores: 9.3 s with 2
    threads, 0.7 s with 1). Large matrices still get the threads they can use.
    """
    return max(1, min(torch.get_num_threads(), width // 1024))


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def eigenbasis(cov: Covariance, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the covariance, in float64 on the CPU.

    A multiple of the identity (``damping`` times the mean eigenvalue, as in the paper) is added so that
    rank-deficient covariances decompose stably; it changes no eigenvector. Each eigenvector's sign is fixed
    (largest entry positive, in the stream's coordinates when the covariance has a frame) so that the basis is
    reproducible.
    """
    matrix = cov.sum.detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise NonFiniteSignalError(
            f"the covariance of {cov.name} holds NaN or Inf; slice with --dtype float32 or bfloat16"
        )
    if cov.tokens == 0:
        raise ValueError(
            f"no calibration tokens reached {cov.name}: the calibration set is empty or fully padded"
        )
    if cov.tokens < cov.width:
        logger.warning(
            "%s: only %d calibration tokens for width %d; the covariance is rank-deficient and damped. "
            "Use more calibration samples for a reliable basis.",
            cov.name,
            cov.tokens,
            cov.width,
        )
    matrix = (matrix + matrix.T) / 2
    mean_diag = matrix.diagonal().mean()
    matrix = matrix + damping * mean_diag * torch.eye(matrix.shape[0], dtype=torch.float64)
    with _threads(eigh_threads(matrix.shape[0])):
        values, vectors = torch.linalg.eigh(matrix)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order] - damping * mean_diag, vectors[:, order]
    if cov.frame is not None:  # y = x F, so an eigenvector v of the frame's sum is F v in the stream's
        vectors = cov.frame.to("cpu", torch.float64) @ vectors
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return values.clamp_min(0), vectors * signs
