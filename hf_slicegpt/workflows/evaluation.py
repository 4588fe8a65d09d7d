"""Perplexity of a causal LM on fixed token windows (dense and sliced models alike)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was computed from, so results can be compared and pooled."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens: n_windows * (seq_len - 1)
    seq_len: int

    def __str__(self) -> str:
        return (
            f"ppl={self.perplexity:.4f} (nll={self.nll:.5f} over {self.tokens} tokens, "
            f"seq_len={self.seq_len})"
        )


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def perplexity(
    model: nn.Module,
    input_ids: torch.LongTensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity ``exp(mean token NLL)`` of ``model`` over non-overlapping windows.

    Each row of ``input_ids`` (shape ``(n_windows, seq_len)``) is scored on its own: a window
    of length ``L`` predicts its last ``L - 1`` tokens. The loss is taken in float32 from the
    logits and summed in float64, so half-precision models and many windows stay accurate, and
    the result does not depend on ``batch_size``.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(batch, seq_len, vocab)``.
        input_ids: token windows, e.g. from :func:`hf_slicegpt.workflows.data.evaluation_tokens`.
        batch_size: windows per forward pass.
        device: where to run; defaults to the model's device.
        show_progress: show a tqdm bar over batches.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D (n_windows, seq_len) tensor, got {shape}; use windows()")
    n_windows, seq_len = input_ids.shape
    if n_windows < 1 or seq_len < 2:
        raise ValueError(
            f"input_ids needs at least one window of >= 2 tokens, got shape {(n_windows, seq_len)}"
        )
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    total_nll = 0.0  # Python float: float64
    try:
        with torch.inference_mode():
            starts = range(0, n_windows, batch_size)
            for start in tqdm(starts, desc="Perplexity", unit="batch", disable=not show_progress):
                batch = input_ids[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(input_ids=batch, use_cache=False).logits
                shift_logits = logits[:, :-1, :].float()
                targets = batch[:, 1:]
                loss = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                total_nll += loss.double().item()
    finally:
        model.train(was_training)

    tokens = n_windows * (seq_len - 1)
    nll = total_nll / tokens
    if not math.isfinite(nll):
        logger.warning("Mean NLL is %s: the model produced non-finite logits", nll)
    try:
        ppl = math.exp(nll)
    except OverflowError:  # nll past ~709.78 nats
        ppl = math.inf
    result = PerplexityResult(perplexity=ppl, nll=nll, tokens=tokens, seq_len=seq_len)
    logger.info("Perplexity %s", result)
    return result
