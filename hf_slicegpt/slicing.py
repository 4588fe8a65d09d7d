"""The layer-by-layer SliceGPT driver: signals -> covariance -> eigenbasis -> rotate and slice.

Each layer is computed once over the calibration tokens. Its inputs come from the already-sliced layers above
it, so errors do not compound. Attention and MLP outputs are rotated after the fact instead of recomputed.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import distributed
from .adapters import FamilyAdapter, get_adapter
from .invariance import center_rows, center_writer, fold_norm, norm_parameters
from .modeling.configuration_sliced import SlicedConfig
from .modeling.modeling_sliced import (
    SlicedFeedForward,
    SlicedModelForCausalLM,
    SlicedRMSNorm,
    attention_layer_kinds,
    attention_masks,
)
from .offload import ActivationStore, check_offload, collect, make_store
from .pca import Covariance, eigenbasis
from .resume import PartialState, fingerprint
from .validation import check_finite_weights, check_model_and_device, record_achieved_sparsity

logger = logging.getLogger(__name__)

# How covariance sums are accumulated (see hf_slicegpt.pca.Covariance): "mixed" (float32 products of row
# chunks summed in float64; measured to give the same sliced model, about twice as fast on a CPU) or "float64".
COVARIANCE_PRECISION = "mixed"
# mid_basis="auto" keeps a planned shared mid basis only if it loses at most this many times the attention output
# energy that the block's own basis of the same width would (see _Slicer._check_shared_mid).
SHARED_MID_TOLERANCE = 2.0

# The slicer class slice_model builds; the low-memory path (hf_slicegpt.streaming) sets its own for one call.
_SLICER_FACTORY: contextvars.ContextVar[Callable[..., Any] | None] = contextvars.ContextVar(
    "slicer_factory", default=None
)


class SlicingError(ValueError):
    """Bad input to :func:`slice_model`."""


def validate_sparsity(sparsity: Any) -> float:
    """Return ``sparsity`` as a float in ``[0, 1)``, or raise naming the value and the fix."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise SlicingError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if sparsity == 1:
        raise SlicingError(
            f"sparsity={sparsity!r} would remove the whole hidden dimension; it must be in [0, 1) "
            "(the fraction of the hidden size removed), e.g. 0.25"
        )
    if 1 < sparsity <= 100:
        raise SlicingError(
            f"sparsity={sparsity!r} looks like a percentage; pass the fraction of the hidden size to remove, "
            f"e.g. {sparsity / 100:g} for {sparsity:g}%"
        )
    if not 0 <= sparsity < 1:
        raise SlicingError(
            f"sparsity must be in [0, 1) (the fraction of the hidden size removed), got {sparsity!r}"
        )
    return float(sparsity)


def sliced_width(hidden_size: int, sparsity: float, round_to: int) -> int:
    """``hidden_size * (1 - sparsity)`` rounded down to a multiple of ``round_to`` (never below it)."""
    if sparsity == 0:
        return hidden_size
    # Rounded to 9 decimals first: 1 - 0.8 is 0.19999999999999996 in floating point, and without it a hidden
    # size of 2560 at 80% would keep 504 instead of 512 (found by tests/test_properties.py).
    width = int(math.floor(round(hidden_size * (1 - sparsity) / round_to, 9))) * round_to
    return max(min(width, hidden_size), min(round_to, hidden_size))


@dataclass
class CalibrationBatch:
    input_ids: torch.LongTensor
    attention_mask: torch.Tensor | None


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
            f"got {type(calibration).__name__}; tokenize text first (see hf_slicegpt.data.calibration_tokens)"
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


@dataclass
class SignalStats:
    """What the calibration data looked like at one point of the residual stream."""

    name: str
    width: int
    kept_width: int
    explained_variance: float
    eigenvalues: list[float] = field(repr=False)


ROTATIONS = ("layer", "global")
SCHEDULES = ("const", "variance")
MID_BASES = ("auto", "own", "shared")
TIED_MODES = ("auto", "project", "slice", "untie")


@dataclass
class WidthPlan:
    """Every residual-stream width of the sliced model, decided before any weight is touched.

    ``shared_mid[l]`` means the MLP of sequential block ``l`` reads the block's input basis, so the attention
    residual needs no shortcut matrix (one ``d x d`` matrix fewer per block).
    """

    embedding: int
    outputs: list[int]
    mids: list[int]
    shared_mid: list[bool]

    @property
    def inputs(self) -> list[int]:
        return [self.embedding, *self.outputs[:-1]]

    @property
    def head(self) -> int:
        return self.outputs[-1]


@dataclass(frozen=True)
class _BlockShape:
    """Residual-side sizes of one block: total output features of its readers, input features of writers."""

    attn_readers: int
    attn_writer: int
    mlp_readers: int
    mlp_writer: int

    @property
    def dense(self) -> int:
        return self.attn_readers + self.attn_writer + self.mlp_readers + self.mlp_writer


@dataclass
class _SignalCovariances:
    """One signal's covariances in the dense pass: raw (global basis) and per-token unit-RMS (schedule)."""

    raw: Covariance | None
    per_token: Covariance | None


def _unit_rms(signal: torch.Tensor) -> torch.Tensor:
    """Each token's vector scaled to unit root-mean-square (the scale a norm layer would remove)."""
    signal = signal.to(torch.float32)
    return signal * torch.rsqrt(signal.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _to_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(device=device, dtype=dtype).contiguous())
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(device=device, dtype=dtype).contiguous())
    return linear


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Slicer:
    def __init__(
        self,
        model: PreTrainedModel,
        adapter: FamilyAdapter,
        batches: list[CalibrationBatch],
        *,
        sparsity: float,
        round_to: int,
        device: torch.device,
        slice_head: bool,
        tied_embeddings: str,
        rotation: str,
        schedule: str,
        mid_basis: str,
        vocab_prior: float,
        show_progress: bool,
        offload: str | None = None,
        offload_dir: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        all_batches: list[CalibrationBatch] | None = None,
    ):
        self.model = model
        self.adapter = adapter
        self.batches = batches
        self.config = model.config
        self.hidden = model.config.hidden_size
        self.width = sliced_width(self.hidden, sparsity, round_to)
        self.sparsity = sparsity
        self.round_to = round_to
        self.device = device
        self.slice_head = slice_head
        self.rotation = rotation
        self.schedule = schedule
        self.mid_basis = mid_basis
        self.vocab_prior = vocab_prior
        self.show_progress = show_progress
        self.sequential = adapter.topology == "sequential"
        embed = model.get_submodule(adapter.embed_tokens)
        lm_head = model.get_submodule(adapter.lm_head)
        self.tied = lm_head.weight.data_ptr() == embed.weight.data_ptr()
        if tied_embeddings == "auto":
            # One basis everywhere lets the vocabulary matrix be sliced once for both ends; per-layer bases
            # keep it at full width with small projections, which is exact.
            tied_embeddings = "slice" if rotation == "global" and adapter.norm == "rms" else "project"
        if tied_embeddings == "slice" and adapter.norm != "rms":
            raise SlicingError(
                f"tied_embeddings='slice' needs an RMSNorm family, and {adapter.name} uses LayerNorm: the head "
                "reads the uncentred vocabulary matrix, which a centred slice cannot give exactly. "
                "Use tied_embeddings='project' (the default)."
            )
        self.tied_mode = tied_embeddings if self.tied else "untie"
        self.dtype = embed.weight.dtype
        self.home = embed.weight.device
        self.layer_norm = adapter.norm == "layer"
        eps = getattr(self.config, adapter.norm_eps_attr, None)
        self.eps = float(eps) if eps is not None else 1e-5
        self.norm = SlicedRMSNorm(self.hidden, self.eps)
        self.stats: list[SignalStats] = []
        self.global_basis: torch.Tensor | None = None
        self._global_slices: dict[int, torch.Tensor] = {}
        self.position_offset: int | None = None
        # Performance and scale (see docs in slice_model): where activations live, data parallelism (this
        # rank's batches in ``batches``, everyone's in ``all_batches``), and the resumable partial state.
        self.covariance_precision = COVARIANCE_PRECISION
        self.offload = offload
        self.offload_dir = offload_dir
        self.all_batches = all_batches if all_batches is not None else batches
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.partial: PartialState | None = None
        self._q_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- plan ----------------------------------------------------------------------------------------------
    def _block_shapes(self) -> list[_BlockShape]:
        adapter = self.adapter
        shapes = []
        for layer in self.model.get_submodule(adapter.layers):
            attn = layer.get_submodule(adapter.attention)
            mlp_owner = layer if adapter.mlp is None else layer.get_submodule(adapter.mlp)
            shapes.append(
                _BlockShape(
                    attn_readers=sum(attn.get_submodule(n).out_features for n in adapter.attn_inputs),
                    attn_writer=attn.get_submodule(adapter.attn_output).in_features,
                    mlp_readers=sum(mlp_owner.get_submodule(n).out_features for n in adapter.mlp_inputs),
                    mlp_writer=mlp_owner.get_submodule(adapter.mlp_output).in_features,
                )
            )
        return shapes

    def _plan_params(self, plan: WidthPlan, shapes: list[_BlockShape]) -> int:
        """Width-dependent parameters under ``plan``: blocks (shortcuts included), embeddings and head."""
        vocab = self.config.vocab_size
        d_embed, d_head = plan.embedding, plan.head
        if self.tied_mode == "project":
            total = self.hidden * (d_embed + d_head)
        elif self.tied_mode == "slice":
            total = vocab * d_embed + d_embed * d_head
        else:
            total = vocab * (d_embed + d_head)
        if self.adapter.embed_positions is not None:
            total += self.config.max_position_embeddings * d_embed
        for idx, shape in enumerate(shapes):
            d_in, d_out = plan.inputs[idx], plan.outputs[idx]
            if self.sequential:
                d_mid = plan.mids[idx]
                total += shape.attn_readers * d_in + shape.attn_writer * d_mid
                total += shape.mlp_readers * d_mid + shape.mlp_writer * d_out + d_mid * d_out
                total += 0 if plan.shared_mid[idx] else d_in * d_mid
            else:
                total += (shape.attn_readers + shape.mlp_readers) * d_in
                total += (shape.attn_writer + shape.mlp_writer) * d_out + d_in * d_out
        return total

    def _decide_mids(self, plan: WidthPlan, shapes: list[_BlockShape]) -> WidthPlan:
        """Share the block input basis with the MLP where a second shortcut would outweigh what slicing saves."""
        if not self.sequential:
            return plan
        for idx, shape in enumerate(shapes):
            d_in, d_mid, d_out = plan.inputs[idx], plan.mids[idx], plan.outputs[idx]
            own = (
                shape.attn_readers * d_in
                + (shape.attn_writer + shape.mlp_readers) * d_mid
                + shape.mlp_writer * d_out
                + d_in * d_mid
                + d_mid * d_out
            )
            share = self.mid_basis == "shared" or (
                self.mid_basis == "auto" and own >= shape.dense * self.hidden
            )
            plan.shared_mid[idx] = share
            if share:
                plan.mids[idx] = d_in
        return plan

    def _const_plan(self, n: int) -> WidthPlan:
        head = self.width if self.slice_head else self.hidden
        return WidthPlan(self.width, [self.width] * (n - 1) + [head], [self.width] * n, [False] * n)

    def _variance_plan(self, spectra: dict[str, torch.Tensor], shapes: list[_BlockShape]) -> WidthPlan:
        """Smallest widths explaining a common variance fraction, with the fraction set by the budget."""
        n = len(shapes)
        budget = self._plan_params(self._decide_mids(self._const_plan(n), shapes), shapes)

        def width(name: str, fraction: float, cap: int) -> int:
            values = spectra[name]
            cumulative = torch.cumsum(values, 0) / values.sum().clamp_min(1e-30)
            k = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))) + 1
            k = math.ceil(k / self.round_to) * self.round_to
            return max(self.round_to, min(k, cap))

        def plan_for(fraction: float) -> WidthPlan:
            outputs = [width(f"layer {i} output", fraction, self.hidden) for i in range(n)]
            if not self.slice_head:
                outputs[-1] = self.hidden
            mids = [
                width(f"layer {i} attention output", fraction, self.hidden) if self.sequential else 0
                for i in range(n)
            ]
            plan = WidthPlan(width("embeddings", fraction, self.hidden), outputs, mids, [False] * n)
            return self._decide_mids(plan, shapes)

        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            if self._plan_params(plan_for(mid), shapes) <= budget:
                low = mid
            else:
                high = mid
        self.variance_fraction = low
        return plan_for(low)

    # -- dense statistics (global rotation, variance schedule) ---------------------------------------------
    @torch.no_grad()
    def _dense_statistics(self, keep_spectra: bool, keep_sum: bool):
        """One pass of the dense model: per-signal spectra and/or the sum of all signal covariances.

        The spectra that set the variance schedule's widths weigh every token the same (each token's signal is
        scaled to unit RMS, as the next norm sees it). Raw sums would not do: from the middle layers on, models
        like SmolLM2 put a massive activation on the first token (norm ~24,000 against ~150), so its one
        direction holds 99% of the raw variance and every such layer would "explain" the target fraction with
        a handful of widths (measured: widths down to 184 of 576 and a 57x perplexity at 25%).
        """
        adapter = self.adapter
        signals, kwargs, masks = self._prepare_batches()
        total = (
            Covariance(
                self.hidden, device=self.device, name="all signals", precision=self.covariance_precision
            )
            if keep_sum
            else None
        )
        spectra: dict[str, torch.Tensor] = {}

        def new(name: str) -> _SignalCovariances:
            def one() -> Covariance:
                return Covariance(
                    self.hidden, device=self.device, name=name, precision=self.covariance_precision
                )

            return _SignalCovariances(one() if keep_sum else None, one() if keep_spectra else None)

        def add(cov: _SignalCovariances, signal: torch.Tensor, mask: torch.Tensor | None) -> None:
            signal = signal - signal.mean(-1, keepdim=True) if self.layer_norm else signal
            if cov.raw is not None:
                cov.raw.add(signal, mask)
            if cov.per_token is not None:
                cov.per_token.add(_unit_rms(signal), mask)

        def record(name: str, batch_signals, prior: bool = False) -> None:
            cov = new(name)
            for signal, mask in zip(batch_signals, masks):
                add(cov, signal, mask)
            finish(cov, prior)

        def finish(cov: _SignalCovariances, prior: bool = False) -> None:
            if cov.raw is not None:
                cov.raw.all_reduce()
                if prior:
                    self._add_vocab_prior(cov.raw)
                total.sum += cov.raw.sum
                total.tokens += cov.raw.tokens
            if cov.per_token is not None:
                cov.per_token.all_reduce()
                if prior:
                    self._add_vocab_prior(cov.per_token, per_token=True)
                spectra[cov.per_token.name] = eigenbasis(cov.per_token)[0]

        record("embeddings", signals, prior=True)
        layers = self.model.get_submodule(adapter.layers)
        for idx in tqdm(
            range(len(layers)), desc="Dense statistics", unit="layer", disable=not self.show_progress
        ):
            layer = self._fetch_layer(idx)
            attn_cov = new(f"layer {idx} attention output") if self.sequential else None
            out_cov = new(f"layer {idx} output")
            attn_out: list[torch.Tensor] = []
            hook = layer.get_submodule(adapter.attention).register_forward_hook(
                lambda _m, _i, out, sink=attn_out: sink.append(_block_output(out))
            )

            def outputs(
                layer=layer, attn_cov=attn_cov, out_cov=out_cov, idx=idx, signals=signals, attn_out=attn_out
            ):
                # One batch at a time: its statistics are added as it is produced, so only the layer
                # outputs are kept (in the activation store), never the attention outputs of every batch.
                for x, kw, mask in zip(signals, kwargs, masks):
                    attn_out.clear()
                    out = _block_output(layer(x, **self._layer_kwargs(kw, idx)))
                    if attn_cov is not None:
                        add(attn_cov, x + attn_out[0], mask)
                    add(out_cov, out, mask)
                    yield out

            try:
                signals = self._collect(outputs())
            finally:
                hook.remove()
            if attn_cov is not None:
                finish(attn_cov)
            finish(out_cov)
            self._release_dense_layer(idx)
        return spectra, total

    # -- bases ---------------------------------------------------------------------------------------------
    def _basis(self, cov: Covariance, width: int) -> torch.Tensor:
        cov.all_reduce()
        values, vectors = eigenbasis(cov)
        total = float(values.sum())
        explained = float(values[:width].sum()) / total if total > 0 else 1.0
        self.stats.append(SignalStats(cov.name, cov.width, width, explained, values.tolist()))
        return vectors[:, :width].contiguous()

    def _next_basis(self, signals: list[torch.Tensor] | None, masks, name: str, width: int) -> torch.Tensor:
        if self.global_basis is not None:
            # The same tensor object for the same width, so shortcuts between equal bases become identities.
            return self._global_slices.setdefault(width, self.global_basis[:, :width].contiguous())
        return self._basis(self._covariance(signals, masks, name), width)

    def _check_shared_mid(self, idx: int, full, masks, q_in: torch.Tensor) -> torch.Tensor:
        """Keep the planned shared mid basis only where it holds the attention output about as well as its own.

        A shared basis projects the attention's contribution onto the block input's principal subspace. Where
        the attention writes strongly outside it (SmolLM2's does in every layer: the shared basis loses 4-20x
        what the block's own loses), that contribution is lost for good: sharing every mid basis took SmolLM2
        at 25% from 1.7x to 185x perplexity. Here the mid signal's energy lost by the shared basis is compared
        with what the signal's own basis of the same width loses; past :data:`SHARED_MID_TOLERANCE` times that,
        the block gets its own basis and one shortcut matrix (a few more parameters, recorded in the plan).
        """
        width = q_in.shape[1]
        cov = self._covariance(full, masks, f"layer {idx} attention output")
        cov.all_reduce()
        values, vectors = eigenbasis(cov)
        matrix = cov.sum.detach().to("cpu", torch.float64)
        q = q_in.to("cpu", torch.float64)
        total = float(matrix.diagonal().sum())
        lost_shared = max(total - float((q * (matrix @ q)).sum()), 0.0)
        lost_own = float(values[width:].sum())
        if lost_shared <= SHARED_MID_TOLERANCE * lost_own + 1e-6 * total:  # slack: float32 signal noise
            return q_in
        logger.info(
            "layer %d: the shared mid basis would lose %.3g of the attention output's energy against %.3g for "
            "its own basis; giving it its own (one more shortcut)",
            idx,
            lost_shared / max(total, 1e-300),
            lost_own / max(total, 1e-300),
        )
        self.plan.shared_mid[idx] = False
        self.plan.mids[idx] = width
        explained = 1.0 - lost_own / total if total > 0 else 1.0
        self.stats.append(SignalStats(cov.name, cov.width, width, explained, values.tolist()))
        return vectors[:, :width].contiguous()

    def _rotate_signals(self, signals: ActivationStore, q: torch.Tensor) -> ActivationStore:
        q32 = q.to(device=self.device, dtype=torch.float32)
        return self._collect((s.to(torch.float32) @ q32).to(self.dtype) for s in signals)

    # -- activations, layers and the partial state (performance and scale) -----------------------------------
    def _new_store(self) -> ActivationStore:
        return make_store(self.offload, self.device, self.offload_dir)

    def _collect(self, tensors) -> ActivationStore:
        """Drain a generator of per-batch tensors into a new activation store (one batch alive at a time)."""
        return collect(tensors, self.offload, self.device, self.offload_dir)

    def _fetch_layer(self, idx: int) -> nn.Module:
        """Dense block ``idx`` on the compute device (the low-memory path loads it from disk here)."""
        return self.model.get_submodule(self.adapter.layers)[idx].to(self.device)

    def _release_dense_layer(self, idx: int) -> None:
        """Block ``idx`` after the dense statistics pass, which still needs it later."""
        self.model.get_submodule(self.adapter.layers)[idx].to(self.home)

    def _layer_tensors(
        self, idx: int, attn: nn.Module, mlp: nn.Module, attn_sc, mlp_sc
    ) -> dict[str, torch.Tensor]:
        """Sliced block ``idx`` under the names of the sliced checkpoint."""
        prefix = f"model.layers.{idx}."
        tensors = {f"{prefix}self_attn.{k}": v for k, v in attn.state_dict().items()}
        tensors.update({f"{prefix}mlp.{k}": v for k, v in mlp.state_dict().items()})
        if attn_sc is not None:
            tensors[f"{prefix}attn_shortcut.weight"] = attn_sc.weight
        if mlp_sc is not None:
            tensors[f"{prefix}mlp_shortcut.weight"] = mlp_sc.weight
        return tensors

    def _finish_layer(
        self, idx, attn, mlp, attn_sc, mlp_sc, attn_modules, mlp_modules, restored=False
    ) -> None:
        """Keep sliced block ``idx`` for the returned model (and record it in the partial state)."""
        if self.partial is not None and not restored:
            self.partial.write_layer(idx, self._layer_tensors(idx, attn, mlp, attn_sc, mlp_sc))
        attn_modules.append(attn.to(self.home))
        mlp_modules.append(mlp.to(self.home))
        self.model.get_submodule(self.adapter.layers)[idx] = nn.Identity()  # the dense block is consumed

    def _restore_block(self, idx: int, tensors: dict[str, torch.Tensor]):
        """Rebuild sliced block ``idx`` from its saved tensors, on the dense block's modules."""
        adapter, meta = self.adapter, any(t.is_meta for t in tensors.values())
        device = "meta" if meta else self.home
        layer = self.model.get_submodule(adapter.layers)[idx]
        attn, mlp = layer.get_submodule(adapter.attention), self._mlp_module(layer)
        mlp_linears = ("fc1", "fc2") if adapter.mlp is None else (*adapter.mlp_inputs, adapter.mlp_output)
        prefix = f"model.layers.{idx}."
        for key, owner, names in (
            ("self_attn", attn, (*adapter.attn_inputs, adapter.attn_output)),
            ("mlp", mlp, mlp_linears),
        ):
            own = {
                k[len(prefix + key) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}{key}.")
            }
            for name in names:
                linear = _to_linear(own[f"{name}.weight"], own.get(f"{name}.bias"), self.dtype, device)
                self._replace(owner, name, linear)
            if not meta:
                owner.load_state_dict(own, strict=True)

        def shortcut(name: str) -> nn.Linear | None:
            weight = tensors.get(f"{prefix}{name}.weight")
            return None if weight is None else _to_linear(weight, None, self.dtype, device)

        return attn, mlp, shortcut("attn_shortcut"), shortcut("mlp_shortcut")

    def _fingerprint(self) -> str:
        """What the sliced result depends on; a partial state from a different run is refused."""
        config = {
            k: v
            for k, v in self.config.to_dict().items()
            if k not in ("_name_or_path", "transformers_version")
        }
        settings = {
            "sparsity": self.sparsity,
            "round_to": self.round_to,
            "slice_head": self.slice_head,
            "rotation": self.rotation,
            "schedule": self.schedule,
            "mid_basis": self.mid_basis,
            "vocab_prior": getattr(self, "vocab_prior", None),
            "tied": self.tied_mode,
            "covariance": self.covariance_precision,
            "dtype": str(self.dtype),
            "world_size": distributed.world_size(),
        }
        embed = self.model.get_submodule(self.adapter.embed_tokens).weight
        parts: list[Any] = [settings, config, float(embed.detach().to(torch.float64).sum())]
        for batch in self.all_batches:
            parts += [batch.input_ids, "no mask" if batch.attention_mask is None else batch.attention_mask]
        return fingerprint(parts)

    def _open_partial(self, n: int) -> dict[str, Any] | None:
        """Set up the partial state; return the record to resume from, if asked and present."""
        if self.checkpoint_dir is None:
            if self.resume:
                raise SlicingError(
                    "resume=True needs checkpoint_dir, the directory of the interrupted run's state"
                )
            return None
        self.partial = PartialState(self.checkpoint_dir, self._fingerprint(), n)
        record = self.partial.load() if self.resume else None
        if record is None:
            self.partial.reset()
        else:
            logger.info(
                "Resuming after %d of %d layers from %s", record["layers_done"], n, self.checkpoint_dir
            )
        return record

    def _restore_plan(self, record: dict[str, Any]) -> WidthPlan:
        self.stats = [SignalStats(**s) for s in record["stats"]]
        self.position_offset = record["position_offset"]
        if "variance_fraction" in record:
            self.variance_fraction = record["variance_fraction"]
        saved = self.partial.load_tensors(record, "cpu")
        if "global_basis" in saved:
            self.global_basis = saved["global_basis"]
        return WidthPlan(**record["plan"])

    def _restore_layers(self, record, need_signals, attn_modules, mlp_modules, attn_shortcuts, mlp_shortcuts):
        """Finished blocks, the carried bases and this rank's activations, exactly as they were saved."""
        start = record["layers_done"]
        if (
            self.global_basis is not None
        ):  # the same objects as an uninterrupted run's, for the identity tests
            q_embed = self._next_basis(None, None, "embeddings", self.plan.embedding)
            q_in = self._next_basis(None, None, "", self.plan.outputs[start - 1]) if start else q_embed
        else:
            saved = self.partial.load_tensors(record, "cpu")
            q_embed, q_in = saved["q_embed"], saved["q_in"]
        for idx in range(start):
            tensors = self.partial.read_layer(idx, self.home, meta=self._restore_meta)
            attn, mlp, attn_sc, mlp_sc = self._restore_block(idx, tensors)
            attn_shortcuts.append(attn_sc)
            if self.sequential:
                mlp_shortcuts.append(mlp_sc)
            self._finish_layer(idx, attn, mlp, attn_sc, mlp_sc, attn_modules, mlp_modules, restored=True)
        signals = (
            self._collect(self.partial.load_signals(record))
            if need_signals and start < len(self.plan.outputs)
            else None
        )
        return start, q_embed, q_in, signals

    _restore_meta = False  # the low-memory path restores finished blocks as shapes only (they are on disk)

    def _may_stay_meta(self, name: str) -> bool:
        """Whether a tensor of the returned model may be left on the meta device (the low-memory path's blocks)."""
        return False

    def _checkpoint(self, done: int, n: int, q_embed, q_in, signals) -> None:
        """Save the partial state every ``checkpoint_every`` layers, and once at the end."""
        if self.partial is None:
            return
        if done < n and (not self.checkpoint_every or done % self.checkpoint_every):
            return
        tensors = {"q_embed": q_embed.clone(), "q_in": q_in.clone()}
        if self.global_basis is not None:
            tensors["global_basis"] = self.global_basis.clone()
        info: dict[str, Any] = {
            "plan": {
                "embedding": self.plan.embedding,
                "outputs": list(self.plan.outputs),
                "mids": list(self.plan.mids),
                "shared_mid": list(self.plan.shared_mid),
            },
            "stats": [
                {
                    "name": s.name,
                    "width": s.width,
                    "kept_width": s.kept_width,
                    "explained_variance": s.explained_variance,
                    "eigenvalues": s.eigenvalues,
                }
                for s in self.stats
            ],
            "position_offset": self.position_offset,
        }
        if hasattr(self, "variance_fraction"):
            info["variance_fraction"] = self.variance_fraction
        self.partial.save(done, tensors, signals if done < n else None, info)

    # -- weights -------------------------------------------------------------------------------------------
    def _rotate_readers(
        self, parent: nn.Module, names: tuple[str, ...], norm: nn.Module, q: torch.Tensor
    ) -> None:
        scale, shift = norm_parameters(norm, self.hidden, self.adapter.norm_weight_offset)
        for name in names:
            linear = parent.get_submodule(name)
            weight = linear.weight.detach().to("cpu", torch.float64)
            bias = None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64)
            weight, bias = fold_norm(weight, bias, scale, shift)
            self._replace(parent, name, _to_linear(weight @ q, bias, self.dtype, self.device))

    def _center_writer(self, parent: nn.Module, name: str) -> None:
        linear = parent.get_submodule(name)
        weight, bias = center_writer(
            linear.weight.detach().to("cpu", torch.float64),
            None if linear.bias is None else linear.bias.detach().to("cpu", torch.float64),
        )
        self._replace(parent, name, _to_linear(weight, bias, self.dtype, self.device))

    def _rotate_writer(self, parent: nn.Module, name: str, q: torch.Tensor) -> None:
        linear = parent.get_submodule(name)
        weight = q.T @ linear.weight.detach().to("cpu", torch.float64)
        bias = None if linear.bias is None else q.T @ linear.bias.detach().to("cpu", torch.float64)
        self._replace(parent, name, _to_linear(weight, bias, self.dtype, self.device))

    @staticmethod
    def _replace(parent: nn.Module, name: str, module: nn.Module) -> None:
        owner, _, attr = name.rpartition(".")
        setattr(parent.get_submodule(owner) if owner else parent, attr, module)

    def _shortcut(self, q_from: torch.Tensor, q_to: torch.Tensor) -> nn.Linear | None:
        """The residual's change of basis; ``None`` (identity) when both ends share the basis."""
        if q_from is q_to:
            return None
        return _to_linear(q_to.T @ q_from, None, self.dtype, self.home)

    def _embedding_scale(self) -> float:
        """The factor on the embedding output (1 for most families), rounded to the model dtype as applied."""
        if self.adapter.embedding_scale is None:
            return 1.0
        return float(torch.tensor(self.adapter.embedding_scale(self.config), dtype=self.dtype))

    def _add_vocab_prior(self, cov: Covariance, per_token: bool = False) -> None:
        """Mix the vocabulary's own statistics into the first basis: every token weighs the same.

        Calibration text covers only some tokens; rare tokens (symbols, code, other languages) would otherwise
        lose their directions in the very first slice. ``vocab_prior`` is the weight of the uniform-vocabulary
        covariance relative to the calibration tokens'.
        """
        if self.vocab_prior <= 0:
            return
        # Scaled by the tokens seen so far: per rank before an all-reduce, or in total after one; either way
        # the sum over ranks is the prior times all calibration tokens.
        table = (
            self.model.get_submodule(self.adapter.embed_tokens).weight.detach().to(self.device, torch.float64)
        )
        if self.layer_norm:
            table = center_rows(table)
        table = _unit_rms(table).to(torch.float64) if per_token else table * self._embedding_scale()
        prior = table.T @ table / table.shape[0]
        cov.sum += self.vocab_prior * max(cov.tokens, 1) * prior.to(cov.sum.device)

    # -- the passes ----------------------------------------------------------------------------------------
    def _prepare_batches(self) -> tuple[ActivationStore, list[dict[str, Any]], list[torch.Tensor | None]]:
        """Embedding outputs (centred for LayerNorm families) and per-batch attention inputs."""
        model, adapter = self.model, self.adapter
        embed = model.get_submodule(adapter.embed_tokens)
        table = embed.weight.detach().to(self.device)
        if self.layer_norm:
            table = center_rows(table.to(torch.float64)).to(self.dtype)
        positions = None
        if adapter.embed_positions is not None:
            pos_module = model.get_submodule(adapter.embed_positions)
            positions = pos_module.weight.detach().to(self.device)
            if self.layer_norm:
                positions = center_rows(positions.to(torch.float64)).to(self.dtype)
            self.position_offset = int(getattr(pos_module, "offset", 0))
        rotary = model.get_submodule(adapter.rotary_emb).to(self.device) if adapter.rotary_emb else None
        embed_scale = self._embedding_scale()
        self.layer_kinds = attention_layer_kinds(self.config)

        signals, kwargs, masks = self._new_store(), [], []
        for batch in self.batches:
            ids = batch.input_ids.to(self.device)
            mask = None if batch.attention_mask is None else batch.attention_mask.to(self.device)
            x = nn.functional.embedding(ids, table)
            if embed_scale != 1.0:
                x = x * embed_scale
            if positions is not None:
                m = mask if mask is not None else torch.ones_like(ids)
                position_ids = (torch.cumsum(m, dim=1) * m - 1).long()
                x = x + nn.functional.embedding(position_ids + self.position_offset, positions)
            else:
                position_ids = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            layer_masks = attention_masks(
                self.config,
                self.layer_kinds,
                inputs_embeds=x,
                attention_mask=mask,
                cache=None,
                position_ids=position_ids,
            )
            # One kind for all layers (the common case) is a plain mask, as the family's own layers expect;
            # mixed full/sliding layers keep one per kind, picked by ``_layer_kwargs``.
            causal_mask = layer_masks[self.layer_kinds[0]] if len(layer_masks) == 1 else layer_masks
            entry: dict[str, Any] = {"attention_mask": causal_mask, "position_ids": position_ids}
            if rotary is not None:
                entry["position_embeddings"] = rotary(x, position_ids=position_ids)
            signals.append(x)
            del x
            kwargs.append(entry)
            masks.append(mask)
        return signals, kwargs, masks

    def _covariance(
        self, signals: list[torch.Tensor], masks: list[torch.Tensor | None], name: str
    ) -> Covariance:
        cov = Covariance(self.hidden, device=self.device, name=name, precision=self.covariance_precision)
        for signal, mask in zip(signals, masks):
            cov.add(signal, mask)
        return cov

    def _layer_kwargs(self, kwargs: dict[str, Any], layer_idx: int) -> dict[str, Any]:
        """The attention inputs of layer ``layer_idx``: its own mask when full and sliding layers mix."""
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, dict):
            return kwargs
        return {**kwargs, "attention_mask": mask[self.layer_kinds[layer_idx]]}

    def _attention(self, attn: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        kwargs = self._layer_kwargs(kwargs, attn.layer_idx)
        return _block_output(attn(hidden_states=self.norm(x), **kwargs))

    def _expand(self, signal: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Map a sliced signal back to the full-width coordinates of the stream."""
        if self._q_cache is None or self._q_cache[0] is not q:  # convert each basis once, not per batch
            self._q_cache = (q, q.T.to(device=self.device, dtype=torch.float32).contiguous())
        return signal.to(torch.float32) @ self._q_cache[1]

    def _mlp_module(self, layer: nn.Module) -> nn.Module:
        adapter = self.adapter
        if adapter.mlp is not None:
            return layer.get_submodule(adapter.mlp)
        fc_in = layer.get_submodule(adapter.mlp_inputs[0])
        fc_out = layer.get_submodule(adapter.mlp_output)
        activation = getattr(self.config, adapter.mlp_activation_attr)
        mlp = SlicedFeedForward(1, 1, 1, activation, bias=fc_in.bias is not None)
        mlp.fc1, mlp.fc2 = fc_in, fc_out
        return mlp

    @torch.no_grad()
    def run(self) -> SlicedModelForCausalLM:
        model, adapter = self.model, self.adapter
        model.eval()
        layers = model.get_submodule(adapter.layers)
        n = len(layers)
        shapes = self._block_shapes()
        record = self._open_partial(n)
        if record is not None:
            plan = self._restore_plan(record)
        elif self.rotation == "global" or self.schedule == "variance":
            spectra, total = self._dense_statistics(self.schedule == "variance", self.rotation == "global")
            if total is not None:
                self.global_basis = self._basis(total, self.hidden)
            plan = (
                self._variance_plan(spectra, shapes) if self.schedule == "variance" else self._const_plan(n)
            )
        else:
            plan = self._const_plan(n)
        if record is not None:
            pass  # the saved plan is final
        elif self.rotation == "global":
            plan.shared_mid = [True] * n
        else:
            plan = self._decide_mids(plan, shapes) if self.schedule == "const" else plan
        self.plan = plan

        # With a global basis nothing below needs the calibration signals: it only rotates weights.
        need_signals = self.global_basis is None
        signals, kwargs, masks = self._prepare_batches() if need_signals else (None, None, None)
        attn_modules, mlp_modules, attn_shortcuts, mlp_shortcuts = [], [], [], []
        start = 0
        if record is not None:
            start, q_embed, q_in, signals = self._restore_layers(
                record, need_signals, attn_modules, mlp_modules, attn_shortcuts, mlp_shortcuts
            )
        else:
            if need_signals:
                cov = self._covariance(signals, masks, "embeddings")
                cov.all_reduce()  # before the prior, which must be added once, not once per rank
                self._add_vocab_prior(cov)
                q_in = self._basis(cov, plan.embedding)
            else:
                q_in = self._next_basis(None, None, "embeddings", plan.embedding)
            q_embed = q_in
            if need_signals:
                signals = self._rotate_signals(signals, q_in)

        mlp_readers = ("fc1",) if adapter.mlp is None else adapter.mlp_inputs
        mlp_writer = "fc2" if adapter.mlp is None else adapter.mlp_output
        for idx in tqdm(
            range(start, n),
            desc="Slicing layers",
            unit="layer",
            initial=start,
            total=n,
            disable=not self.show_progress or not distributed.is_main_process(),
        ):
            layer = self._fetch_layer(idx)
            attn = layer.get_submodule(adapter.attention)
            mlp = self._mlp_module(layer)
            attn_norm = layer.get_submodule(adapter.attn_norm)
            self._rotate_readers(attn, adapter.attn_inputs, attn_norm, q_in)
            if self.layer_norm:
                self._center_writer(attn, adapter.attn_output)
                self._center_writer(mlp, mlp_writer)

            full = None
            if self.sequential:
                if need_signals:
                    full = self._collect(
                        self._expand(x, q_in) + self._attention(attn, x, kw) for x, kw in zip(signals, kwargs)
                    )
                if plan.shared_mid[idx]:
                    q_mid = q_in
                    if need_signals and self.mid_basis == "auto":
                        q_mid = self._check_shared_mid(idx, full, masks, q_in)
                else:
                    q_mid = self._next_basis(full, masks, f"layer {idx} attention output", plan.mids[idx])
                self._rotate_writer(attn, adapter.attn_output, q_mid)
                attn_shortcuts.append(self._shortcut(q_in, q_mid))
                self._rotate_readers(mlp, mlp_readers, layer.get_submodule(adapter.mlp_norm), q_mid)
                if need_signals:
                    # Drop each activation set as soon as it is used: at most one full-width set is alive.
                    signals, full = self._rotate_signals(full, q_mid), None
                    full = self._collect(self._expand(x, q_mid) + mlp(self.norm(x)) for x in signals)
                q_out = self._next_basis(full, masks, f"layer {idx} output", plan.outputs[idx])
                self._rotate_writer(mlp, mlp_writer, q_out)
                mlp_shortcuts.append(self._shortcut(q_mid, q_out))
            else:
                # The MLP of a parallel block reads the attention norm's output, or its own norm of the same input.
                mlp_norm = layer.get_submodule(adapter.mlp_norm) if adapter.mlp_norm else attn_norm
                self._rotate_readers(mlp, mlp_readers, mlp_norm, q_in)
                if need_signals:
                    full = self._collect(
                        self._expand(x, q_in) + self._attention(attn, x, kw) + mlp(self.norm(x))
                        for x, kw in zip(signals, kwargs)
                    )
                q_out = self._next_basis(full, masks, f"layer {idx} output", plan.outputs[idx])
                self._rotate_writer(attn, adapter.attn_output, q_out)
                self._rotate_writer(mlp, mlp_writer, q_out)
                attn_shortcuts.append(self._shortcut(q_in, q_out))
            if need_signals:
                signals = None  # the block input is used up
                signals = self._rotate_signals(full, q_out)
            del full
            mlp_sc = mlp_shortcuts[idx] if self.sequential else None
            self._finish_layer(idx, attn, mlp, attn_shortcuts[idx], mlp_sc, attn_modules, mlp_modules)
            q_in = q_out
            self._checkpoint(idx + 1, n, q_embed, q_in, signals)

        return self._assemble(q_embed, q_in, attn_modules, mlp_modules, attn_shortcuts, mlp_shortcuts)

    def _settings(self) -> dict[str, Any]:
        settings = {
            "method": "slicegpt",
            "rotation": self.rotation,
            "schedule": self.schedule,
            "mid_basis": self.mid_basis,
            "vocab_prior": self.vocab_prior,
            "tied_embeddings": self.tied_mode if self.tied else None,
            "sparsity": self.sparsity,
            "round_to": self.round_to,
            "slice_head": self.slice_head,
            "family": self.adapter.name,
            "norm": self.adapter.norm,
            "calibration_sequences": sum(b.input_ids.shape[0] for b in self.all_batches),
            "calibration_tokens": sum(
                int(b.attention_mask.sum()) if b.attention_mask is not None else b.input_ids.numel()
                for b in self.all_batches
            ),
        }
        if self.schedule == "variance":
            settings["variance_fraction"] = self.variance_fraction
        return settings

    def _assemble(self, q_embed, q_head, attn_modules, mlp_modules, attn_shortcuts, mlp_shortcuts):
        model, adapter, config, plan = self.model, self.adapter, self.config, self.plan
        embed = model.get_submodule(adapter.embed_tokens)
        lm_head = model.get_submodule(adapter.lm_head)
        scale, shift = norm_parameters(
            model.get_submodule(adapter.final_norm), self.hidden, adapter.norm_weight_offset
        )
        # The input side reads the table times the family's embedding scale; a tied head reads it unscaled.
        embed_scale = self._embedding_scale()
        head_bias = None if lm_head.bias is None else lm_head.bias.detach().to("cpu", torch.float64)
        mode = self.tied_mode
        d_embed = q_embed.shape[1]

        sliced_config = SlicedConfig(
            family_config=config,
            topology=adapter.topology,
            norm_divisor=self.hidden,
            norm_eps=self.eps,
            embedding_dim=d_embed,
            attn_input_dims=plan.inputs,
            mlp_input_dims=plan.mids if self.sequential else None,
            head_input_dim=q_head.shape[1],
            attn_shortcuts=[s is not None for s in attn_shortcuts],
            mlp_shortcuts=[s is not None for s in mlp_shortcuts] if self.sequential else [],
            embed_proj=mode == "project",
            head_proj=mode in ("project", "slice"),
            head_proj_dim=d_embed if mode == "slice" else self.hidden,
            head_proj_bias=mode in ("project", "slice") and shift is not None,
            lm_head_bias=head_bias is not None or (mode == "untie" and shift is not None),
            tie_word_embeddings=mode in ("project", "slice"),
            position_embedding_offset=self.position_offset,
            attention_class=_qualname(attn_modules[0]),
            mlp_class=None if adapter.mlp is None else _qualname(mlp_modules[0]),
            rotary_class=_qualname(model.get_submodule(adapter.rotary_emb)) if adapter.rotary_emb else None,
            mlp_activation=getattr(config, adapter.mlp_activation_attr)
            if adapter.mlp_activation_attr
            else None,
            attention_module="self_attn",
            attention_cache_kwarg=adapter.attn_cache_kwarg,
            attn_input_names=list(adapter.attn_inputs),
            attn_output_name=adapter.attn_output,
            mlp_input_names=["fc1"] if adapter.mlp is None else list(adapter.mlp_inputs),
            mlp_output_name="fc2" if adapter.mlp is None else adapter.mlp_output,
            slicing=self._settings(),
        )
        record_achieved_sparsity(sliced_config)
        with torch.device("meta"):
            sliced = SlicedModelForCausalLM(sliced_config)

        for idx, block in enumerate(sliced.model.layers):
            block.self_attn = attn_modules[idx]
            block.mlp = mlp_modules[idx]
            block.attn_shortcut = attn_shortcuts[idx]
            if self.sequential:
                block.mlp_shortcut = mlp_shortcuts[idx]

        vocab, padding_idx = embed.weight.shape[0], embed.padding_idx
        if mode == "project":
            # One vocabulary matrix for both ends, at full width: the input side projects it into the first
            # basis (after centring, which is linear), the head projects the last basis back out through the
            # final norm. Exact, at the cost of two small hidden x width matrices.
            # A plain embedding sharing the table: the family's module may add its own behaviour (Gemma scales
            # its output), which the projection below already folds in.
            sliced.model.embed_tokens = nn.Embedding(vocab, self.hidden, padding_idx, device="meta")
            sliced.model.embed_tokens.weight = embed.weight
            projection = q_embed.T * embed_scale
            if self.layer_norm:
                projection = projection - projection.mean(dim=1, keepdim=True)
            sliced.model.embed_proj = _to_linear(projection, None, self.dtype, self.home)
            sliced.head_proj = _to_linear(scale[:, None] * q_head, shift, self.dtype, self.home)
            sliced.lm_head = lm_head
            sliced.lm_head.weight = sliced.model.embed_tokens.weight
        else:
            new_embed = nn.Embedding(vocab, d_embed, padding_idx, device="meta")
            # The float64 copy of the vocabulary matrix is made only here (the project mode never needs it).
            table = embed.weight.detach().to("cpu", torch.float64)
            centered = (center_rows(table) if self.layer_norm else table) * embed_scale
            new_embed.weight = nn.Parameter((centered @ q_embed).to(self.home, self.dtype))
            del table, centered
            sliced.model.embed_tokens = new_embed
            if mode == "slice":
                # The vocabulary matrix is sliced once, in the embedding basis; the head maps the last basis
                # (through the final norm) into it with one small width x width matrix.
                # The shared matrix carries the embedding scale (if any), which the head must not see.
                head_map = q_embed.T @ (scale[:, None] * q_head) / embed_scale
                head_shift = None if shift is None else q_embed.T @ shift / embed_scale
                sliced.head_proj = _to_linear(head_map, head_shift, self.dtype, self.home)
                head = nn.Linear(d_embed, vocab, bias=head_bias is not None, device="meta")
                head.weight = sliced.model.embed_tokens.weight
                if head_bias is not None:
                    head.bias = nn.Parameter(head_bias.to(self.home, self.dtype))
                sliced.lm_head = head
            else:
                weight, bias = fold_norm(
                    lm_head.weight.detach().to("cpu", torch.float64), head_bias, scale, shift
                )
                sliced.lm_head = _to_linear(weight @ q_head, bias, self.dtype, self.home)

        if adapter.embed_positions is not None:
            positions = model.get_submodule(adapter.embed_positions).weight.detach().to("cpu", torch.float64)
            if self.layer_norm:
                positions = center_rows(positions)
            table_pos = nn.Embedding(positions.shape[0], d_embed, device="meta")
            table_pos.weight = nn.Parameter((positions @ q_embed).to(self.home, self.dtype))
            sliced.model.embed_positions = table_pos
        if adapter.rotary_emb is not None:
            sliced.model.rotary_emb = model.get_submodule(adapter.rotary_emb).to(self.home)

        leftover = [
            name
            for name, p in list(sliced.named_parameters()) + list(sliced.named_buffers())
            if p.is_meta and not self._may_stay_meta(name)
        ]
        if leftover:
            raise RuntimeError(f"internal error: sliced model has unassigned tensors {leftover}")
        # A half-precision model can overflow where the float64 maths did not (a rotated weight beyond the
        # fp16 range): such a model must never be returned, let alone saved.
        check_finite_weights(sliced)
        sliced.generation_config = model.generation_config
        sliced.slicing_stats = self.stats
        sliced.eval()
        return sliced


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SlicingError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def slice_model(
    model: PreTrainedModel,
    calibration: torch.LongTensor | Iterable[Mapping[str, torch.Tensor]],
    sparsity: float,
    *,
    round_to: int = 8,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    slice_head: bool = True,
    rotation: str = "layer",
    schedule: str = "const",
    mid_basis: str = "auto",
    tied_embeddings: str = "auto",
    vocab_prior: float = 0.0,
    show_progress: bool = True,
    offload: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> SlicedModelForCausalLM:
    """Slice a causal LM with SliceGPT and return a :class:`SlicedModelForCausalLM`.

    Args:
        model: a transformers causal LM of a supported family (see ``hf_slicegpt.supported_model_types()``).
            It is **consumed**: its modules are rotated and sliced in place and moved into the returned model,
            so that a large model never exists twice in memory. Pass ``copy.deepcopy(model)`` to keep it.
        calibration: token ids ``(N, L)``, or an iterable of batches ``{"input_ids", "attention_mask"}``.
            Padding (``attention_mask == 0``) is left out of the covariances.
        sparsity: the fraction of the hidden size removed, in ``[0, 1)``.
        round_to: every sliced width is rounded to a multiple of this, for kernel efficiency.
        batch_size: calibration sequences per forward pass (for a tensor ``calibration``).
        device: where layers are computed (default: the model's device). Each layer visits it in turn.
        slice_head: also slice the head's input width; ``False`` keeps the last basis at full width.
        rotation: ``"layer"`` (the paper: a basis per signal, computed through the already-sliced layers) or
            ``"global"`` (one basis for the whole residual stream: no shortcut matrices, and RMSNorm families
            can be exported to their own architecture with :func:`hf_slicegpt.export_native`).
        schedule: ``"const"`` (every width the same) or ``"variance"`` (each signal keeps the smallest width
            explaining a common fraction of its variance, with the fraction set so the parameter budget equals
            the const schedule's at this sparsity).
        mid_basis: for sequential blocks, ``"own"`` gives the MLP input its own basis (the paper, two shortcuts
            per block), ``"shared"`` reuses the block input's (one shortcut), ``"auto"`` plans to share only where the
            second shortcut would make the block larger than the dense one, and keeps a planned share only if
            the shared basis holds the attention output about as well as the block's own (on SmolLM2 it never
            does: sharing costs 185x perplexity at 25%, so "auto" there is the paper's layout).
        tied_embeddings: for a model with tied embeddings, ``"project"`` keeps the vocabulary matrix at full
            width with small projections at both ends (exact), ``"slice"`` slices it once in the embedding
            basis with a small map in front of the head, ``"untie"`` unties it (the reference's behaviour,
            adds ``vocab x width``); ``"auto"`` is ``"slice"`` for global rotation and ``"project"`` otherwise.
        vocab_prior: weight of the vocabulary's own statistics (every token equally) in the first basis,
            relative to the calibration tokens; keeps rare tokens' directions when calibration text is narrow.
        show_progress: show tqdm bars.
        offload: where the calibration activations wait between layers: ``None`` on ``device``, ``"cpu"`` in
            host RAM (a GPU then holds one batch at a time), ``"disk"`` in a memory-mapped temporary file (host
            RAM holds one batch at a time). The result is the same.
        checkpoint_dir: keep a resumable partial state here (finished blocks, the carried basis and the
            activations; safetensors and JSON). It is written once at the end and, with ``checkpoint_every``,
            every that many layers. Delete it after saving the result.
        checkpoint_every: checkpoint the partial state every this many layers (0: only at the end).
        resume: continue from the partial state in ``checkpoint_dir`` if there is one (it must come from the
            same model, calibration and settings); the result is bit-identical to an uninterrupted run's.

    Under ``torchrun`` (``torch.distributed`` initialised, e.g. by
    :func:`hf_slicegpt.distributed.init_from_environment`), each rank computes the layers on its share of the
    calibration batches and the covariances are summed over ranks; every rank returns the same model.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> import hf_slicegpt
    >>> dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> sliced = hf_slicegpt.slice_model(dense, torch.randint(0, 128, (8, 16)), sparsity=0.25)
    >>> sliced.config.attn_input_dims, sliced.config.head_input_dim
    ([24, 24], 24)
    ```
    """
    check_model_and_device(model, device)
    sparsity = validate_sparsity(sparsity)
    if getattr(model.config, "model_type", None) == SlicedConfig.model_type:
        done = (model.config.slicing or {}).get("sparsity")
        raise SlicingError(
            f"this model is already sliced (sparsity={done}); slice the dense original model instead, "
            "at the total sparsity wanted"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SlicingError(f"round_to must be a positive integer, got {round_to!r}")
    rotation = _choice("rotation", rotation, ROTATIONS)
    schedule = _choice("schedule", schedule, SCHEDULES)
    mid_basis = _choice("mid_basis", mid_basis, MID_BASES)
    tied_embeddings = _choice("tied_embeddings", tied_embeddings, TIED_MODES)
    if (
        isinstance(vocab_prior, bool)
        or not isinstance(vocab_prior, (int, float))
        or not 0 <= vocab_prior < math.inf
    ):
        raise SlicingError(f"vocab_prior must be a non-negative number, got {vocab_prior!r}")
    if rotation == "global" and schedule != "const":
        raise SlicingError("rotation='global' uses one width everywhere; use schedule='const' with it")
    if rotation == "global" and not slice_head:
        raise SlicingError("rotation='global' slices the head with the same basis; drop slice_head=False")
    adapter = get_adapter(model.config)
    batches = calibration_batches(calibration, batch_size, model.config.vocab_size)
    offload = check_offload(offload)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise SlicingError(
            f"checkpoint_every must be a non-negative integer (layers), got {checkpoint_every!r}"
        )
    if checkpoint_every and checkpoint_dir is None:
        raise SlicingError("checkpoint_every needs checkpoint_dir, the directory for the partial state")
    local_batches = distributed.shard(batches)
    if distributed.world_size() > len(batches):
        logger.warning(
            "%d ranks but only %d calibration batches: some ranks compute nothing; lower --batch-size",
            distributed.world_size(),
            len(batches),
        )
    if device is None:
        device = model.get_input_embeddings().weight.device
    slicer = (_SLICER_FACTORY.get() or _Slicer)(
        model,
        adapter,
        local_batches,
        all_batches=batches,
        offload=offload,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=bool(resume),
        sparsity=sparsity,
        round_to=round_to,
        device=torch.device(device),
        slice_head=slice_head,
        tied_embeddings=tied_embeddings,
        rotation=rotation,
        schedule=schedule,
        mid_basis=mid_basis,
        vocab_prior=float(vocab_prior),
        show_progress=show_progress,
    )
    logger.info(
        "Slicing %s (%d layers, %s rotation, %s schedule) from hidden size %d to %d",
        adapter.name,
        model.config.num_hidden_layers,
        rotation,
        schedule,
        slicer.hidden,
        slicer.width,
    )
    return slicer.run()
