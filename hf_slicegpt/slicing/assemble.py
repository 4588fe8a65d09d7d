"""Assemble the :class:`SlicedModelForCausalLM` from the rotated parts: config, blocks, embeddings and head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..checkpoint.validation import check_finite_weights, record_achieved_sparsity
from ..modeling.configuration_sliced import SlicedConfig
from ..modeling.modeling_sliced import SlicedModelForCausalLM
from .calibration import token_count
from .context import SlicingRun
from .refit import fit_step
from .rotate import center_rows, embedding_scale, fold_norm, norm_parameters, to_linear
from .source import SlicedBlock

METHOD = "slicegpt"


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def settings(run: SlicingRun) -> dict[str, Any]:
    """What the checkpoint records of the run: the config as resolved, the family, the calibration size."""
    cfg = run.config
    out = {
        "method": METHOD,
        "rotation": cfg.rotation,
        "schedule": cfg.schedule,
        "mid_basis": cfg.mid_basis,
        "vocab_prior": cfg.vocab_prior,
        "tied_embeddings": run.tied_mode if run.tied else None,
        "sparsity": cfg.sparsity,
        "round_to": cfg.round_to,
        "slice_head": cfg.slice_head,
        "family": run.adapter.name,
        "norm": run.adapter.norm,
        "calibration_sequences": sum(b.input_ids.shape[0] for b in run.all_batches),
        "calibration_tokens": token_count(run.all_batches),
    }
    if cfg.schedule == "variance":
        out["variance_fraction"] = run.variance_fraction
    out["correction"] = correction_summary(run)
    out["config"] = cfg.to_dict()  # as requested: SlicingConfig.from_dict(config.slicing) rebuilds it exactly
    return out


def correction_summary(run: SlicingRun) -> dict[str, Any]:
    """Which correction made the weights, and how much of each update's held-out error it removed."""
    cfg = run.config
    if cfg.correction == "none":
        return {"method": "none"}
    done = [c for c in run.corrections if c["strength"] != float("inf")]
    chosen = sorted({c["strength"] for c in run.corrections})
    before = sum(c["held_out_error"][0] for c in run.corrections)
    after = sum(c["held_out_error"][1] for c in run.corrections)
    return {
        "method": cfg.correction,
        "shortcuts": cfg.correction_shortcuts,
        "fraction": cfg.correction_fraction,
        "fit_every": fit_step(run),
        "updates": len(run.corrections),
        "updates_changed": len(done),
        "held_out_error_ratio": after / before if before > 0 else None,
        "strengths": {f"{s:g}": sum(c["strength"] == s for c in run.corrections) for s in chosen},
    }


def sliced_config(
    run: SlicingRun, d_embed: int, d_head: int, blocks: list[SlicedBlock], head_bias, shift
) -> SlicedConfig:
    """The complete generic config: ``from_pretrained`` builds the model from it alone, on the meta device."""
    adapter, config, plan, mode = run.adapter, run.family_config, run.plan, run.tied_mode
    return SlicedConfig(
        family_config=config,
        topology=adapter.topology,
        norm_divisor=run.hidden,
        norm_eps=run.eps,
        embedding_dim=d_embed,
        attn_input_dims=plan.inputs,
        mlp_input_dims=plan.mids if run.sequential else None,
        head_input_dim=d_head,
        attn_shortcuts=[b.attn_shortcut is not None for b in blocks],
        mlp_shortcuts=[b.mlp_shortcut is not None for b in blocks] if run.sequential else [],
        embed_proj=mode == "project",
        head_proj=mode in ("project", "slice"),
        head_proj_dim=d_embed if mode == "slice" else run.hidden,
        head_proj_bias=mode in ("project", "slice") and shift is not None,
        lm_head_bias=head_bias is not None or (mode == "untie" and shift is not None),
        tie_word_embeddings=mode in ("project", "slice"),
        position_embedding_offset=run.position_offset,
        attention_class=_qualname(blocks[0].attn),
        mlp_class=None if adapter.mlp is None else _qualname(blocks[0].mlp),
        rotary_class=_qualname(run.model.get_submodule(adapter.rotary_emb)) if adapter.rotary_emb else None,
        mlp_activation=getattr(config, adapter.mlp_activation_attr) if adapter.mlp_activation_attr else None,
        attention_module="self_attn",
        attention_cache_kwarg=adapter.attn_cache_kwarg,
        attn_input_names=list(adapter.attn_inputs),
        attn_output_name=adapter.attn_output,
        mlp_input_names=["fc1"] if adapter.mlp is None else list(adapter.mlp_inputs),
        mlp_output_name="fc2" if adapter.mlp is None else adapter.mlp_output,
        slicing=settings(run),
    )


def _project_tied(
    run: SlicingRun, sliced, embed, lm_head, q_embed, q_head, scale, shift, embed_scale
) -> None:
    """One vocabulary matrix for both ends, at full width.

    The input side projects it into the first basis (after centring, which is linear), the head projects the
    last basis back out through the final norm. Exact, at the cost of two small hidden x width matrices. A plain
    embedding shares the table: the family's module may add its own behaviour (Gemma scales its output), which
    the projection already folds in.
    """
    vocab, padding_idx = embed.weight.shape[0], embed.padding_idx
    sliced.model.embed_tokens = nn.Embedding(vocab, run.hidden, padding_idx, device="meta")
    sliced.model.embed_tokens.weight = embed.weight
    projection = q_embed.T * embed_scale
    if run.layer_norm:
        projection = projection - projection.mean(dim=1, keepdim=True)
    sliced.model.embed_proj = to_linear(projection, None, run.dtype, run.home)
    sliced.head_proj = to_linear(scale[:, None] * q_head, shift, run.dtype, run.home)
    sliced.lm_head = lm_head
    sliced.lm_head.weight = sliced.model.embed_tokens.weight


def _slice_vocabulary(
    run: SlicingRun, sliced, embed, lm_head, q_embed, q_head, scale, shift, embed_scale, head_bias
):
    """The vocabulary matrix in the embedding basis; the head either shares it ("slice") or is its own."""
    vocab, padding_idx, d_embed = embed.weight.shape[0], embed.padding_idx, q_embed.shape[1]
    new_embed = nn.Embedding(vocab, d_embed, padding_idx, device="meta")
    # The float64 copy of the vocabulary matrix is made only here (the project mode never needs it).
    table = embed.weight.detach().to("cpu", torch.float64)
    centered = (center_rows(table) if run.layer_norm else table) * embed_scale
    new_embed.weight = nn.Parameter((centered @ q_embed).to(run.home, run.dtype))
    del table, centered
    sliced.model.embed_tokens = new_embed
    if run.tied_mode == "slice":
        # The vocabulary matrix is sliced once, in the embedding basis; the head maps the last basis (through
        # the final norm) into it with one small width x width matrix. The shared matrix carries the embedding
        # scale (if any), which the head must not see.
        head_map = q_embed.T @ (scale[:, None] * q_head) / embed_scale
        head_shift = None if shift is None else q_embed.T @ shift / embed_scale
        sliced.head_proj = to_linear(head_map, head_shift, run.dtype, run.home)
        head = nn.Linear(d_embed, vocab, bias=head_bias is not None, device="meta")
        head.weight = sliced.model.embed_tokens.weight
        if head_bias is not None:
            head.bias = nn.Parameter(head_bias.to(run.home, run.dtype))
        sliced.lm_head = head
    else:
        weight, bias = fold_norm(lm_head.weight.detach().to("cpu", torch.float64), head_bias, scale, shift)
        sliced.lm_head = to_linear(weight @ q_head, bias, run.dtype, run.home)


def _position_and_rotary(run: SlicingRun, sliced, q_embed) -> None:
    model, adapter = run.model, run.adapter
    if adapter.embed_positions is not None:
        positions = model.get_submodule(adapter.embed_positions).weight.detach().to("cpu", torch.float64)
        if run.layer_norm:
            positions = center_rows(positions)
        table = nn.Embedding(positions.shape[0], q_embed.shape[1], device="meta")
        table.weight = nn.Parameter((positions @ q_embed).to(run.home, run.dtype))
        sliced.model.embed_positions = table
    if adapter.rotary_emb is not None:
        sliced.model.rotary_emb = model.get_submodule(adapter.rotary_emb).to(run.home)


def assemble(run: SlicingRun, q_embed: torch.Tensor, q_head: torch.Tensor, blocks: list[SlicedBlock]):
    """The sliced model, checked: no tensor left unassigned, no non-finite weight."""
    model, adapter = run.model, run.adapter
    embed = model.get_submodule(adapter.embed_tokens)
    lm_head = model.get_submodule(adapter.lm_head)
    scale, shift = norm_parameters(
        model.get_submodule(adapter.final_norm), run.hidden, adapter.norm_weight_offset
    )
    # The input side reads the table times the family's embedding scale; a tied head reads it unscaled.
    embed_scale = embedding_scale(adapter, run.family_config, run.dtype)
    head_bias = None if lm_head.bias is None else lm_head.bias.detach().to("cpu", torch.float64)
    config = sliced_config(run, q_embed.shape[1], q_head.shape[1], blocks, head_bias, shift)
    record_achieved_sparsity(config)  # beside the requested one; warns when a clamped width differs
    with torch.device("meta"):
        sliced = SlicedModelForCausalLM(config)
    for idx, layer in enumerate(sliced.model.layers):
        layer.self_attn, layer.mlp = blocks[idx].attn, blocks[idx].mlp
        layer.attn_shortcut = blocks[idx].attn_shortcut
        if run.sequential:
            layer.mlp_shortcut = blocks[idx].mlp_shortcut
    if run.tied_mode == "project":
        _project_tied(run, sliced, embed, lm_head, q_embed, q_head, scale, shift, embed_scale)
    else:
        _slice_vocabulary(run, sliced, embed, lm_head, q_embed, q_head, scale, shift, embed_scale, head_bias)
    _position_and_rotary(run, sliced, q_embed)
    tensors = list(sliced.named_parameters()) + list(sliced.named_buffers())
    leftover = [name for name, p in tensors if p.is_meta and not run.source.may_stay_meta(name)]
    if leftover:
        raise RuntimeError(f"internal error: sliced model has unassigned tensors {leftover}")
    # A half-precision model can overflow where the float64 maths did not (a rotated weight beyond the fp16
    # range): such a model must never be returned, let alone saved.
    check_finite_weights(sliced)
    sliced.generation_config = model.generation_config
    sliced.slicing_stats = run.stats
    sliced.eval()
    return sliced


__all__ = ["METHOD", "assemble", "correction_summary", "settings", "sliced_config"]
