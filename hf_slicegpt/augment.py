"""Calibration augmented with text the model writes itself.

Directions that carry little variance on the user's calibration text can still carry other kinds of text
(formatting, symbols, code, rare tokens). Sampling from the dense model before slicing gives text from the
model's own distribution, which covers those directions, works with any user data, and needs no download.
"""

from __future__ import annotations

import logging
import re

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class AugmentError(ValueError):
    """A malformed ``--calibration-augment`` specification."""


def parse_augment(spec: str | None) -> int:
    """``"self:N"`` -> ``N`` (self-generated sequences); ``None``/``""``/``"none"`` -> 0."""
    if spec is None or spec in ("", "none"):
        return 0
    match = re.fullmatch(r"self:(\d+)", spec.strip())
    if not match or int(match.group(1)) < 1:
        raise AugmentError(
            f"calibration augmentation {spec!r} is not understood; use self:N with N >= 1, e.g. self:32"
        )
    return int(match.group(1))


@torch.no_grad()
def self_generated_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    num_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    temperature: float = 1.0,
    top_p: float = 0.95,
    show_progress: bool = True,
) -> torch.LongTensor:
    """``num_samples`` sequences of ``seq_len`` tokens sampled from ``model``, starting from its BOS token.

    Sampling (not greedy) with nucleus ``top_p`` keeps the text diverse without the long tail of garbage.
    Deterministic for a given ``seed`` on a given machine.
    """
    if num_samples < 1 or seq_len < 2:
        raise AugmentError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    if bos is None:
        raise AugmentError(
            "self-generated calibration needs a BOS token id on the tokenizer or the model config"
        )
    device = model.get_input_embeddings().weight.device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    pad = getattr(model.generation_config, "pad_token_id", None) or getattr(
        model.generation_config, "eos_token_id", 0
    )
    if isinstance(pad, list):
        pad = pad[0]
    outputs = []
    try:
        for start in tqdm(
            range(0, num_samples, batch_size), desc="Self-generating calibration", disable=not show_progress
        ):
            n = min(batch_size, num_samples - start)
            prompt = torch.full((n, 1), bos, dtype=torch.long, device=device)
            tokens = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=seq_len - 1,
                min_new_tokens=seq_len - 1,
                pad_token_id=pad,
                use_cache=True,
            )
            outputs.append(tokens[:, :seq_len].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    result = torch.cat(outputs)
    logger.info("Self-generated %d calibration sequences of %d tokens", result.shape[0], result.shape[1])
    return result


__all__ = ["AugmentError", "parse_augment", "self_generated_tokens"]
