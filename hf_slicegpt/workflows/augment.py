"""Calibration augmented beyond the user's text: self-generated sequences and vocabulary swaps.

Directions that carry little variance on the user's calibration text can still carry other kinds of text
(formatting, symbols, code, rare tokens). Two augmentations cover more of them, work with any user data and need
no download:

- ``self:N`` samples N sequences from the dense model before slicing (text from the model's own distribution);
- ``swap:F`` adds a copy of every calibration window in which a fraction F of its distinct tokens is replaced,
  consistently, by other vocabulary tokens. Out of domain, SliceGPT mostly loses in-context copying of words the
  calibration never uses; a swapped copy keeps the window's structure and repetitions with words it lacked.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SliceGPTError

logger = logging.getLogger(__name__)


class AugmentError(SliceGPTError):
    """A malformed ``--calibration-augment`` specification."""


@dataclass(frozen=True)
class Augmentation:
    """A parsed ``--calibration-augment``: self-generated sequences and the vocabulary-swap fraction."""

    self_samples: int = 0
    swap_fraction: float = 0.0

    def __bool__(self) -> bool:
        return self.self_samples > 0 or self.swap_fraction > 0


_AUGMENT_HELP = "use self:N (N >= 1), swap:F (0 < F <= 1) or both joined by a comma, e.g. self:32,swap:0.3"


def parse_augment(spec: str | None) -> Augmentation:
    """``"self:N"``, ``"swap:F"`` or ``"self:N,swap:F"`` -> :class:`Augmentation`; ``None``/``""``/``"none"``
    -> no augmentation."""
    if spec is None or spec.strip() in ("", "none"):
        return Augmentation()
    values: dict[str, str] = {}
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(self|swap):([0-9.]+)\s*", part)
        if not match or match.group(1) in values:
            raise AugmentError(f"calibration augmentation {spec!r} is not understood; {_AUGMENT_HELP}")
        values[match.group(1)] = match.group(2)
    try:
        samples = int(values.get("self", "0"))
        fraction = float(values.get("swap", "0"))
    except ValueError:
        raise AugmentError(f"calibration augmentation {spec!r} is not understood; {_AUGMENT_HELP}") from None
    if ("self" in values and samples < 1) or ("swap" in values and not 0 < fraction <= 1):
        raise AugmentError(f"calibration augmentation {spec!r} is out of range; {_AUGMENT_HELP}")
    return Augmentation(samples, fraction)


def swapped_tokens(
    tokens: torch.Tensor,
    fraction: float,
    vocab_size: int,
    *,
    protected: Iterable[int] = (),
    seed: int = 0,
    rank_offset: float = 200.0,
) -> torch.LongTensor:
    """A copy of ``tokens`` (windows x length) with ``fraction`` of each window's distinct tokens swapped.

    Every occurrence of a chosen token becomes the same replacement, so the window keeps its repetitions: the
    model copies words it has seen earlier in the context, and that is what breaks out of domain. Replacements
    are drawn with probability proportional to ``1 / (rank + rank_offset)``, where rank is the order of the
    token ids: byte-pair and sentencepiece vocabularies are numbered roughly by frequency, so common words
    come up more often than the long tail. ``protected`` ids (special tokens) are never chosen or drawn.
    Deterministic for a given ``seed``.
    """
    if not 0 < fraction <= 1:
        raise AugmentError(f"the swap fraction must be in (0, 1], got {fraction!r}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 2:
        raise AugmentError(
            f"expected calibration tokens of shape (windows, length), got {tuple(tokens.shape)}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise AugmentError(f"calibration token ids must lie in [0, {vocab_size}); check the tokenizer")
    keep = torch.ones(vocab_size, dtype=torch.bool)
    fixed = [i for i in protected if 0 <= i < vocab_size]
    keep[fixed] = False
    candidates = keep.nonzero().flatten()
    if candidates.numel() < 2:
        raise AugmentError(f"a vocabulary of {vocab_size} ids has too few ordinary tokens to swap")
    weights = 1.0 / (torch.arange(candidates.numel(), dtype=torch.float64) + rank_offset)
    generator = torch.Generator().manual_seed(seed)
    out = tokens.clone()
    for row in range(tokens.shape[0]):
        types = tokens[row].unique()
        types = types[keep[types]]
        chosen = types[torch.rand(types.numel(), generator=generator) < fraction]
        if not chosen.numel():
            continue
        drawn = torch.multinomial(weights, chosen.numel(), replacement=True, generator=generator)
        table = torch.arange(vocab_size)
        table[chosen] = candidates[drawn]
        out[row] = table[tokens[row]]
    logger.info("Swapped %.0f%% of the token types in %d calibration windows", 100 * fraction, out.shape[0])
    return out


def swap_for_tokenizer(
    tokens: torch.Tensor,
    fraction: float,
    tokenizer: PreTrainedTokenizerBase,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
) -> torch.LongTensor:
    """:func:`swapped_tokens` over ``tokenizer``'s vocabulary, never touching its special or added tokens.

    ``vocab_size`` (the model's) caps the ids drawn, for tokenizers larger than the embedding table.
    """
    protected = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    size = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    return swapped_tokens(tokens, fraction, size, protected=protected, seed=seed)


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


__all__ = [
    "AugmentError",
    "Augmentation",
    "parse_augment",
    "self_generated_tokens",
    "swap_for_tokenizer",
    "swapped_tokens",
]
