"""Signal statistics: covariance sums, the eigenbases kept, and the dense pass that plans widths.

Every covariance goes through the run's ``covariance`` hook and every kept basis through its ``basis`` hook
(:class:`~hf_slicegpt.slicing.context.SlicingHooks`), so research variants need no patching.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .context import SignalStats, SlicingRun
from .pca import Covariance, eigenbasis
from .rotate import center_rows, embedding_scale
from .signals import Masks, Residual, block_output, drain, embed_calibration, layer_kwargs, unit_rms

logger = logging.getLogger(__name__)


def new_covariance(run: SlicingRun, name: str, frame: torch.Tensor | None = None) -> Covariance:
    return Covariance(
        run.hidden, device=run.device, name=name, precision=run.config.covariance_precision, frame=frame
    )


def covariance(
    run: SlicingRun,
    signals: Sequence[torch.Tensor],
    masks: Masks,
    name: str,
    frame: torch.Tensor | None = None,
) -> Covariance:
    """``sum X^T X`` of a signal over this rank's unpadded calibration tokens, through the ``covariance`` hook.

    ``frame``: the signals' coordinates (:class:`~hf_slicegpt.slicing.pca.Covariance`); the loop uses frames
    only where no ``covariance`` hook is set, since hooks see the stream's own coordinates.
    """
    cov = new_covariance(run, name, frame)
    for signal, mask in zip(signals, masks):
        cov.add(signal, mask)
    return run.hooks.covariance(name, cov, signals, masks) if run.hooks.covariance else cov


def basis(run: SlicingRun, cov: Covariance, width: int) -> torch.Tensor:
    """The ``(D, width)`` basis kept for a signal: its leading eigenvectors, or the ``basis`` hook's choice."""
    cov.all_reduce()
    values, vectors = eigenbasis(cov)
    total = float(values.sum())
    explained = float(values[:width].sum()) / total if total > 0 else 1.0
    run.stats.append(SignalStats(cov.name, cov.width, width, explained, values.tolist()))
    if run.hooks.basis is not None:
        return run.hooks.basis(cov.name, values, vectors, width).contiguous()
    return _kept(run, vectors, width)


def _kept(run: SlicingRun, vectors: torch.Tensor, width: int) -> torch.Tensor:
    """The leading ``width`` eigenvectors; all of them are kept as the frame of the signal in that basis."""
    q = vectors[:, :width].contiguous()
    run.frame_cache = (q, vectors)
    return q


def next_basis(run: SlicingRun, full: Residual | None, masks, name: str, width: int) -> torch.Tensor:
    """The basis of the next signal: from its covariance, or a slice of the global basis."""
    if run.global_basis is not None:
        # The same tensor object for the same width, so shortcuts between equal bases become identities.
        return run.global_slices.setdefault(width, run.global_basis[:, :width].contiguous())
    if full is None:
        raise ValueError(f"{name}: a per-layer basis needs the signal it is computed from")
    return basis(run, covariance(run, full.signals, masks, name, full.frame), width)


def check_shared_mid(
    run: SlicingRun, idx: int, full: Residual, masks: Masks, q_in: torch.Tensor
) -> torch.Tensor:
    """Keep the planned shared mid basis only where it holds the attention output about as well as its own.

    A shared basis projects the attention's contribution onto the block input's principal subspace. Where the
    attention writes strongly outside it (SmolLM2's does in every layer: the shared basis loses 4-20x what the
    block's own loses), that contribution is lost for good: sharing every mid basis took SmolLM2 at 25% from
    1.7x to 185x perplexity. The mid signal's energy lost by the shared basis is compared with what the
    signal's own basis of the same width loses; past ``shared_mid_tolerance`` times that, the block gets its
    own basis and one shortcut matrix (a few more parameters, recorded in the plan).
    """
    width = q_in.shape[1]
    cov = covariance(run, full.signals, masks, f"layer {idx} attention output", full.frame)
    cov.all_reduce()
    values, vectors = eigenbasis(cov)
    matrix = cov.sum.detach().to("cpu", torch.float64)  # in the signal's frame, as is q below
    q = q_in.to("cpu", torch.float64)
    if full.frame is not None:
        q = full.frame.T @ q
    total = float(matrix.diagonal().sum())
    lost_shared = max(total - float((q * (matrix @ q)).sum()), 0.0)
    lost_own = float(values[width:].sum())
    if lost_shared <= run.config.shared_mid_tolerance * lost_own + 1e-6 * total:  # slack: float32 noise
        return q_in
    logger.info(
        "layer %d: the shared mid basis would lose %.3g of the attention output's energy against %.3g for its "
        "own basis; giving it its own (one more shortcut)",
        idx,
        lost_shared / max(total, 1e-300),
        lost_own / max(total, 1e-300),
    )
    run.plan.shared_mid[idx] = False
    run.plan.mids[idx] = width
    explained = 1.0 - lost_own / total if total > 0 else 1.0
    run.stats.append(SignalStats(cov.name, cov.width, width, explained, values.tolist()))
    return _kept(run, vectors, width)


def add_vocab_prior(run: SlicingRun, cov: Covariance, per_token: bool = False) -> None:
    """Mix the vocabulary's own statistics into the first basis: every token weighs the same.

    Calibration text covers only some tokens; rare tokens (symbols, code, other languages) would otherwise lose
    their directions in the very first slice. ``vocab_prior`` is the weight of the uniform-vocabulary covariance
    relative to the calibration tokens'.
    """
    if run.config.vocab_prior <= 0:
        return
    # Scaled by the tokens seen so far: per rank before an all-reduce, or in total after one; either way the sum
    # over ranks is the prior times all calibration tokens.
    table = run.model.get_submodule(run.adapter.embed_tokens).weight.detach().to(run.device, torch.float64)
    if run.layer_norm:
        table = center_rows(table)
    scale = embedding_scale(run.adapter, run.family_config, run.dtype)
    table = unit_rms(table).to(torch.float64) if per_token else table * scale
    prior = table.T @ table / table.shape[0]
    cov.sum += run.config.vocab_prior * max(cov.tokens, 1) * prior.to(cov.sum.device)


@dataclass
class _DenseSums:
    """The dense pass's sums: per-signal unit-RMS covariances (spectra) and/or the sum of all raw ones."""

    run: SlicingRun
    total: Covariance | None
    spectra: dict[str, torch.Tensor]
    keep_spectra: bool

    def new(self, name: str) -> tuple[Covariance | None, Covariance | None]:
        keep_sum = self.total is not None
        return (
            new_covariance(self.run, name) if keep_sum else None,
            new_covariance(self.run, name) if self.keep_spectra else None,
        )

    def add(self, covs, signal: torch.Tensor, mask) -> None:
        raw, per_token = covs
        signal = signal - signal.mean(-1, keepdim=True) if self.run.layer_norm else signal
        if raw is not None:
            raw.add(signal, mask)
        if per_token is not None:
            per_token.add(unit_rms(signal), mask)

    def finish(self, covs, prior: bool = False) -> None:
        raw, per_token = covs
        if raw is not None:
            raw.all_reduce()
            if prior:
                add_vocab_prior(self.run, raw)
            if self.run.hooks.covariance:
                raw = self.run.hooks.covariance(raw.name, raw, (), ())
            self.total.sum += raw.sum
            self.total.tokens += raw.tokens
        if per_token is not None:
            per_token.all_reduce()
            if prior:
                add_vocab_prior(self.run, per_token, per_token=True)
            self.spectra[per_token.name] = eigenbasis(per_token)[0]


@torch.no_grad()
def dense_statistics(run: SlicingRun, keep_spectra: bool, keep_sum: bool):
    """One pass of the dense model: per-signal spectra and/or the sum of all signal covariances.

    The spectra that set the variance schedule's widths weigh every token the same (each token's signal is
    scaled to unit RMS, as the next norm sees it). Raw sums would not do: from the middle layers on, models like
    SmolLM2 put a massive activation on the first token (norm ~24,000 against ~150), so its one direction holds
    99% of the raw variance and every such layer would "explain" the target fraction with a handful of widths
    (measured: widths down to 184 of 576 and a 57x perplexity at 25%).
    """
    signals, kwargs, masks = embed_calibration(run)
    sums = _DenseSums(run, new_covariance(run, "all signals") if keep_sum else None, {}, keep_spectra)
    embeddings = sums.new("embeddings")
    for signal, mask in zip(signals, masks):
        sums.add(embeddings, signal, mask)
    sums.finish(embeddings, prior=True)
    n = len(run.layers())
    for idx in tqdm(range(n), desc="Dense statistics", unit="layer", disable=not run.options.show_progress):
        layer = run.source.fetch(idx, run.device)
        attn_covs = sums.new(f"layer {idx} attention output") if run.sequential else None
        out_covs = sums.new(f"layer {idx} output")
        attn_out: list[torch.Tensor] = []
        hook = layer.get_submodule(run.adapter.attention).register_forward_hook(
            lambda _m, _i, out, sink=attn_out: sink.append(block_output(out))
        )

        def outputs(
            layer=layer, attn_covs=attn_covs, out_covs=out_covs, idx=idx, signals=signals, sink=attn_out
        ):
            # One batch at a time: its statistics are added as it is produced, so only the layer outputs are
            # kept (in the activation store), never the attention outputs of every batch.
            for x, kw, mask in zip(signals, kwargs, masks):
                sink.clear()
                out = block_output(layer(x, **layer_kwargs(run, kw, idx)))
                if attn_covs is not None:
                    sums.add(attn_covs, x + sink[0], mask)
                sums.add(out_covs, out, mask)
                yield out

        try:
            signals = drain(run, outputs())
        finally:
            hook.remove()
        if attn_covs is not None:
            sums.finish(attn_covs)
        sums.finish(out_covs)
        run.source.release(idx)
    return sums.spectra, sums.total


__all__ = [
    "add_vocab_prior",
    "basis",
    "check_shared_mid",
    "covariance",
    "dense_statistics",
    "new_covariance",
    "next_basis",
]
