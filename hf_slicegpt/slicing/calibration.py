"""Calibration input: a token tensor or an iterable of batches, normalised and checked against the vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import SlicingError


@dataclass
class CalibrationBatch:
    input_ids: torch.LongTensor
    attention_mask: torch.Tensor | None


def token_count(batches: list[CalibrationBatch]) -> int:
    """The calibration tokens that count: unpadded ones (all of them without an attention mask)."""
    return sum(
        int(b.attention_mask.sum()) if b.attention_mask is not None else b.input_ids.numel() for b in batches
    )


def calibration_batches(calibration: Any, batch_size: int, vocab_size: int) -> list[CalibrationBatch]:
    """Normalise a ``(N, L)`` token tensor or an iterable of ``{"input_ids", "attention_mask"}`` batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SlicingError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(calibration, torch.Tensor):
        ids = _check_ids(calibration, "calibration")
        batches = [
            CalibrationBatch(ids[i : i + batch_size], None) for i in range(0, ids.shape[0], batch_size)
        ]
    elif isinstance(calibration, Mapping) and "input_ids" in calibration:
        raise SlicingError(
            f"calibration is a single batch ({type(calibration).__name__}); pass a list of batches, "
            "e.g. [batch], or its token ids, batch['input_ids']"
        )
    elif isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise SlicingError(
            f"calibration must be a LongTensor of token ids (N, L) or an iterable of batches with 'input_ids', "
            f"got {type(calibration).__name__}; tokenize text first (see hf_slicegpt.workflows.data.calibration_tokens)"
        )
    else:
        batches = []
        for i, item in enumerate(calibration):
            if isinstance(item, torch.Tensor):
                item = {"input_ids": item}
            if not isinstance(item, Mapping) or "input_ids" not in item:
                raise SlicingError(
                    f"calibration batch {i} must be a dict with 'input_ids', got {type(item).__name__}"
                )
            ids = _check_ids(torch.as_tensor(item["input_ids"]), f"calibration batch {i}")
            mask = item.get("attention_mask")
            if mask is not None:
                mask = torch.as_tensor(mask)
                if mask.dim() == 1:
                    mask = mask.unsqueeze(0)
                if mask.shape != ids.shape:
                    raise SlicingError(
                        f"calibration batch {i}: attention_mask shape {tuple(mask.shape)} != input_ids shape "
                        f"{tuple(ids.shape)}"
                    )
                mask = mask.to(torch.long)
            batches.append(CalibrationBatch(ids, mask))
    if not batches:
        raise SlicingError("calibration is empty: pass at least one sequence of token ids")
    for batch in batches:
        if int(batch.input_ids.max()) >= vocab_size:
            raise SlicingError(
                f"calibration holds token id {int(batch.input_ids.max())} but the model's vocabulary has "
                f"{vocab_size} entries; was it tokenized with this model's tokenizer?"
            )
    return batches


def _check_ids(ids: torch.Tensor, what: str) -> torch.LongTensor:
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SlicingError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.numel() == 0:
        raise SlicingError(
            f"{what} must be a non-empty (N, L) tensor of token ids, got shape {tuple(ids.shape)}"
        )
    if int(ids.min()) < 0:
        raise SlicingError(f"{what} holds negative token ids")
    return ids.to(torch.long)


__all__ = ["CalibrationBatch", "calibration_batches"]
