"""The resumable partial state of a run: what is saved every few layers, and how a run picks up from it."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch

from ..runtime import distributed
from ..runtime.resume import PartialState, fingerprint
from .config import SlicingError
from .context import SignalStats, SlicingRun
from .plan import WidthPlan
from .refit import DenseStream, correcting, fit_batches
from .rotate import replace_module, to_linear
from .signals import drain, mlp_module, update_frame
from .source import SlicedBlock
from .statistics import next_basis


def run_fingerprint(run: SlicingRun) -> str:
    """What the sliced result depends on; a partial state from a different run is refused."""
    config = {
        k: v
        for k, v in run.family_config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version")
    }
    cfg = run.config
    settings = {
        "sparsity": cfg.sparsity,
        "round_to": cfg.round_to,
        "slice_head": cfg.slice_head,
        "rotation": cfg.rotation,
        "schedule": cfg.schedule,
        "mid_basis": cfg.mid_basis,
        "vocab_prior": cfg.vocab_prior,
        "tied": run.tied_mode,
        "covariance": cfg.covariance_precision,
        "correction": [
            cfg.correction,
            cfg.correction_fraction,
            cfg.correction_basis,
            cfg.correction_shortcuts,
        ],
        "dtype": str(run.dtype),
        "world_size": distributed.world_size(),
    }
    embed = run.model.get_submodule(run.adapter.embed_tokens).weight
    parts: list[Any] = [settings, config, float(embed.detach().to(torch.float64).sum())]
    for batch in run.all_batches:
        parts += [batch.input_ids, "no mask" if batch.attention_mask is None else batch.attention_mask]
    return fingerprint(parts)


def open_partial(run: SlicingRun, n: int) -> dict[str, Any] | None:
    """Set up the partial state; return the record to resume from, if asked and present."""
    options = run.options
    if options.checkpoint_dir is None:
        if options.resume:
            raise SlicingError(
                "resume=True needs checkpoint_dir, the directory of the interrupted run's state"
            )
        return None
    run.partial = PartialState(options.checkpoint_dir, run_fingerprint(run), n)
    record = run.partial.load() if options.resume else None
    if record is None:
        run.partial.reset()
    else:
        logger.info(
            "Resuming after %d of %d layers from %s", record["layers_done"], n, options.checkpoint_dir
        )
    return record


def restore_plan(run: SlicingRun, record: dict[str, Any]) -> WidthPlan:
    run.stats = [SignalStats(**s) for s in record["stats"]]
    run.position_offset = record["position_offset"]
    run.corrections = list(record.get("corrections", []))
    if "variance_fraction" in record:
        run.variance_fraction = record["variance_fraction"]
    saved = run.partial.load_tensors(record, "cpu")
    if "global_basis" in saved:
        run.global_basis = saved["global_basis"]
    return WidthPlan(**record["plan"])


def restore_block(run: SlicingRun, idx: int, tensors: dict[str, torch.Tensor]) -> SlicedBlock:
    """Rebuild sliced block ``idx`` from its saved tensors, on the dense block's modules."""
    adapter, meta = run.adapter, any(t.is_meta for t in tensors.values())
    device = "meta" if meta else run.home
    layer = run.layers()[idx]
    attn, mlp = layer.get_submodule(adapter.attention), mlp_module(run, layer)
    mlp_linears = ("fc1", "fc2") if adapter.mlp is None else (*adapter.mlp_inputs, adapter.mlp_output)
    prefix = f"model.layers.{idx}."
    for key, owner, names in (
        ("self_attn", attn, (*adapter.attn_inputs, adapter.attn_output)),
        ("mlp", mlp, mlp_linears),
    ):
        own = {k[len(prefix + key) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}{key}.")}
        for name in names:
            replace_module(
                owner, name, to_linear(own[f"{name}.weight"], own.get(f"{name}.bias"), run.dtype, device)
            )
        if not meta:
            owner.load_state_dict(own, strict=True)

    def shortcut(name: str):
        weight = tensors.get(f"{prefix}{name}.weight")
        return None if weight is None else to_linear(weight, None, run.dtype, device)

    return SlicedBlock(attn, mlp, shortcut("attn_shortcut"), shortcut("mlp_shortcut"))


def restore_layers(run: SlicingRun, record: dict[str, Any], need_signals: bool, blocks: list[SlicedBlock]):
    """Finished blocks, the carried bases and this rank's activations, exactly as they were saved."""
    start = record["layers_done"]
    if run.global_basis is not None:  # the same objects as an uninterrupted run's, for the identity tests
        q_embed = next_basis(run, None, None, "embeddings", run.plan.embedding)
        q_in = next_basis(run, None, None, "", run.plan.outputs[start - 1]) if start else q_embed
    else:
        saved = run.partial.load_tensors(record, "cpu")
        q_embed, q_in = saved["q_embed"], saved["q_in"]
        if "q_in_frame" in saved:  # the next update's frame, as the uninterrupted run has it
            run.frame_cache = (q_in, saved["q_in_frame"])
    for idx in range(start):
        tensors = run.partial.read_layer(idx, run.home, meta=run.source.restore_meta)
        block = restore_block(run, idx, tensors)
        blocks.append(block)
        run.source.finish(run, idx, block, restored=True)
    signals = stream = None
    if need_signals and start < len(run.plan.outputs):
        signals = drain(run, run.partial.load_signals(record))
        if correcting(run):
            fit, first = fit_batches(run)
            stream = DenseStream(drain(run, run.partial.load_signals(record, "dense")), fit, first)
    return start, q_embed, q_in, signals, stream


def save_checkpoint(run: SlicingRun, done: int, n: int, q_embed, q_in, signals, stream=None) -> None:
    """Save the partial state every ``checkpoint_every`` layers, and once at the end."""
    every = run.options.checkpoint_every
    if run.partial is None or (done < n and (not every or done % every)):
        return
    tensors = {"q_embed": q_embed.clone(), "q_in": q_in.clone()}
    if run.global_basis is not None:
        tensors["global_basis"] = run.global_basis.clone()
    elif done < n and not correcting(run):
        frame = update_frame(run, q_in)  # the frame the next update sums in: a resumed run must sum alike
        if frame is not None:
            tensors["q_in_frame"] = frame.clone()
    plan = run.plan
    info: dict[str, Any] = {
        "plan": {
            "embedding": plan.embedding,
            "outputs": list(plan.outputs),
            "mids": list(plan.mids),
            "shared_mid": list(plan.shared_mid),
        },
        "stats": [asdict(s) for s in run.stats],
        "position_offset": run.position_offset,
    }
    if run.variance_fraction is not None:
        info["variance_fraction"] = run.variance_fraction
    if run.corrections:
        info["corrections"] = run.corrections
    dense = stream.signals if stream is not None and done < n else None
    run.partial.save(done, tensors, signals if done < n else None, info, dense)


logger = logging.getLogger(__name__)

__all__ = ["open_partial", "restore_layers", "restore_plan", "save_checkpoint"]
