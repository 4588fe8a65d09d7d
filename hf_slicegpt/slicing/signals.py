"""The calibration signals: embedding them, moving them through a block, and changing their basis."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling.modeling_sliced import SlicedFeedForward, attention_layer_kinds, attention_masks
from ..runtime.offload import ActivationStore, collect, make_store
from .context import SlicingRun
from .rotate import center_rows, embedding_scale

Masks = list[torch.Tensor | None]


def unit_rms(signal: torch.Tensor) -> torch.Tensor:
    """Each token's vector scaled to unit root-mean-square (the scale a norm layer would remove)."""
    signal = signal.to(torch.float32)
    return signal * torch.rsqrt(signal.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))


def block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def new_store(run: SlicingRun) -> ActivationStore:
    return make_store(run.options.offload, run.device, run.options.offload_dir)


def drain(run: SlicingRun, tensors: Iterable[torch.Tensor]) -> ActivationStore:
    """Drain a generator of per-batch tensors into a new activation store (one batch alive at a time)."""
    return collect(tensors, run.options.offload, run.device, run.options.offload_dir)


def _table(run: SlicingRun, module: nn.Module) -> torch.Tensor:
    table = module.weight.detach().to(run.device)
    return center_rows(table.to(torch.float64)).to(run.dtype) if run.layer_norm else table


def embed_calibration(run: SlicingRun) -> tuple[ActivationStore, list[dict[str, Any]], Masks]:
    """Embedding outputs (centred for LayerNorm families) and the per-batch attention inputs."""
    model, adapter = run.model, run.adapter
    table = _table(run, model.get_submodule(adapter.embed_tokens))
    positions = None
    if adapter.embed_positions is not None:
        pos_module = model.get_submodule(adapter.embed_positions)
        positions = _table(run, pos_module)
        run.position_offset = int(getattr(pos_module, "offset", 0))
    rotary = model.get_submodule(adapter.rotary_emb).to(run.device) if adapter.rotary_emb else None
    scale = embedding_scale(run.adapter, run.family_config, run.dtype)
    run.layer_kinds = attention_layer_kinds(run.family_config)

    signals, kwargs, masks = new_store(run), [], []
    for batch in run.batches:
        ids = batch.input_ids.to(run.device)
        mask = None if batch.attention_mask is None else batch.attention_mask.to(run.device)
        x = nn.functional.embedding(ids, table)
        if scale != 1.0:
            x = x * scale
        if positions is not None:
            m = mask if mask is not None else torch.ones_like(ids)
            position_ids = (torch.cumsum(m, dim=1) * m - 1).long()
            x = x + nn.functional.embedding(position_ids + run.position_offset, positions)
        else:
            position_ids = torch.arange(ids.shape[1], device=run.device).unsqueeze(0)
        layer_masks = attention_masks(
            run.family_config,
            run.layer_kinds,
            inputs_embeds=x,
            attention_mask=mask,
            cache=None,
            position_ids=position_ids,
        )
        # One kind for all layers (the common case) is a plain mask, as the family's own layers expect; mixed
        # full/sliding layers keep one per kind, picked by ``layer_kwargs``.
        causal_mask = layer_masks[run.layer_kinds[0]] if len(layer_masks) == 1 else layer_masks
        entry: dict[str, Any] = {"attention_mask": causal_mask, "position_ids": position_ids}
        if rotary is not None:
            entry["position_embeddings"] = rotary(x, position_ids=position_ids)
        signals.append(x)
        del x
        kwargs.append(entry)
        masks.append(mask)
    return signals, kwargs, masks


def layer_kwargs(run: SlicingRun, kwargs: dict[str, Any], layer_idx: int) -> dict[str, Any]:
    """The attention inputs of layer ``layer_idx``: its own mask when full and sliding layers mix."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, dict):
        return kwargs
    return {**kwargs, "attention_mask": mask[run.layer_kinds[layer_idx]]}


def attention(run: SlicingRun, attn: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The sliced attention's output for a sliced input (through the weightless norm)."""
    kwargs = layer_kwargs(run, kwargs, attn.layer_idx)
    return block_output(attn(hidden_states=run.norm(x), **kwargs))


def expand(run: SlicingRun, signal: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Map a sliced signal back to the full-width coordinates of the stream."""
    if run.q_cache is None or run.q_cache[0] is not q:  # convert each basis once, not per batch
        run.q_cache = (q, q.T.to(device=run.device, dtype=torch.float32).contiguous())
    return signal.to(torch.float32) @ run.q_cache[1]


@dataclass
class Residual:
    """The residual stream after one update, at full width: ``signals`` hold ``y = x F`` for the stream's ``x``,
    where ``F`` is ``frame`` (``None``: the stream's own coordinates, ``F = I``).

    In the frame of the update's input basis ``q`` (:func:`signal_frame`), the sliced input ``x_q`` is
    ``[x_q, 0]`` and needs no expansion ``x_q q^T`` (one ``n x d x D`` product per update, half of the signal
    rotations): the writers write into the frame instead, at no extra cost per token.
    """

    signals: ActivationStore
    frame: torch.Tensor | None = None


def update_frame(run: SlicingRun, q: torch.Tensor) -> torch.Tensor | None:
    """The frame a plain update from the basis ``q`` is summed in, or ``None`` where it expands instead: with a
    ``covariance`` hook (hooks see the stream's coordinates), in half precision (a rotated half-precision writer
    would round), or for a ``q`` without orthonormal columns (a ``basis`` hook may return one)."""
    if run.hooks.covariance is not None or run.dtype not in (torch.float32, torch.float64):
        return None
    return signal_frame(run, q)


def signal_frame(run: SlicingRun, q: torch.Tensor) -> torch.Tensor | None:
    """An orthogonal ``(D, D)`` float64 matrix whose first columns are ``q``: the eigenvectors ``q`` was kept
    from, or else ``q`` completed by a QR decomposition (a basis from a hook, or an older resumable state that
    saved no frame); ``None`` if ``q``'s columns are not orthonormal, which no frame can start with."""
    if run.frame_cache is not None and run.frame_cache[0] is q:
        return run.frame_cache[1]
    q64 = q.to("cpu", torch.float64)
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    if not torch.allclose(q64.T @ q64, eye, rtol=0, atol=1e-6):
        return None
    complete = torch.linalg.qr(q64, mode="complete")[0]
    frame = torch.cat([q64, complete[:, q.shape[1] :]], dim=1)
    run.frame_cache = (q, frame)
    return frame


def rotate_signals(
    run: SlicingRun, signals: ActivationStore, q: torch.Tensor, frame: torch.Tensor | None = None
) -> ActivationStore:
    """Every batch of ``signals`` (full width, in ``frame``) in the basis ``q`` (``q``'s width out)."""
    if frame is not None:
        q = frame.T @ q.to("cpu", torch.float64)
    q32 = q.to(device=run.device, dtype=torch.float32)
    return drain(run, ((s.to(torch.float32) @ q32).to(run.dtype) for s in signals))


def mlp_module(run: SlicingRun, layer: nn.Module) -> nn.Module:
    """The block's MLP as one module (families with loose fc1/fc2 get them wrapped)."""
    adapter = run.adapter
    if adapter.mlp is not None:
        return layer.get_submodule(adapter.mlp)
    fc_in = layer.get_submodule(adapter.mlp_inputs[0])
    fc_out = layer.get_submodule(adapter.mlp_output)
    activation = getattr(run.family_config, adapter.mlp_activation_attr)
    mlp = SlicedFeedForward(1, 1, 1, activation, bias=fc_in.bias is not None)
    mlp.fc1, mlp.fc2 = fc_in, fc_out
    return mlp


__all__ = [
    "Residual",
    "attention",
    "block_output",
    "drain",
    "embed_calibration",
    "expand",
    "layer_kwargs",
    "mlp_module",
    "new_store",
    "rotate_signals",
    "signal_frame",
    "unit_rms",
    "update_frame",
]
