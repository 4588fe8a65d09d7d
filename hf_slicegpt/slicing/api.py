"""``slice_model``: the one entry point of the algorithm."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel

from ..adapters import get_adapter
from ..modeling.configuration_sliced import SlicedConfig
from ..modeling.modeling_sliced import SlicedModelForCausalLM
from ..runtime import distributed
from ..runtime.devices import DeviceError, check_device
from ..runtime.offload import check_offload
from .calibration import calibration_batches
from .config import SlicingConfig, SlicingError
from .context import RuntimeOptions, SlicingHooks, new_run
from .loop import slice_layers
from .source import InMemoryLayers, LayerSource

logger = logging.getLogger(__name__)


def _resolve_config(config: SlicingConfig | float | None, overrides: dict[str, Any]) -> SlicingConfig:
    """A ``SlicingConfig`` from a config, a bare sparsity, and/or keyword overrides."""
    if config is None and "sparsity" not in overrides:
        raise SlicingError("slice_model needs a sparsity: pass SlicingConfig(sparsity=...) or e.g. 0.25")
    try:
        if isinstance(config, SlicingConfig):
            return replace(config, **overrides) if overrides else config
        return SlicingConfig(**({"sparsity": config} if config is not None else {}), **overrides)
    except TypeError as err:  # an unknown keyword
        raise SlicingError(f"{err}; the options are the fields of hf_slicegpt.SlicingConfig") from None


def _check_model_and_device(model: Any, device: Any) -> None:
    """Refuse what ``slice_model`` cannot take, with the project's error instead of an AttributeError deep inside.

    ``model`` must be a transformers ``PreTrainedModel`` (a causal LM with a config); ``device`` ``None``, a
    ``torch.device`` or a device string this machine has.
    """
    if model is None or not isinstance(model, PreTrainedModel) or not hasattr(model, "config"):
        raise SlicingError(
            f"model must be a transformers causal LM (a PreTrainedModel such as LlamaForCausalLM), got "
            f"{type(model).__name__}; load one with AutoModelForCausalLM.from_pretrained"
        )
    if device is not None:
        try:
            check_device(device)
        except DeviceError as err:  # slice_model's own refusals are all SlicingErrors
            raise SlicingError(str(err)) from None


def _check_checkpointing(checkpoint_dir: Any, checkpoint_every: Any) -> None:
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise SlicingError(
            f"checkpoint_every must be a non-negative integer (layers), got {checkpoint_every!r}"
        )
    if checkpoint_every and checkpoint_dir is None:
        raise SlicingError("checkpoint_every needs checkpoint_dir, the directory for the partial state")


def slice_model(
    model: PreTrainedModel,
    calibration: torch.LongTensor | Iterable[Mapping[str, torch.Tensor]],
    config: SlicingConfig | float | None = None,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    show_progress: bool = True,
    offload: str | None = None,
    offload_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    hooks: SlicingHooks | None = None,
    source: LayerSource | None = None,
    **options: Any,
) -> SlicedModelForCausalLM:
    """Slice a causal LM with SliceGPT and return a :class:`SlicedModelForCausalLM`.

    Args:
        model: a transformers causal LM of a supported family (see ``hf_slicegpt.supported_model_types()``).
            It is **consumed**: its modules are rotated and sliced in place and moved into the returned model,
            so that a large model never exists twice in memory. Pass ``copy.deepcopy(model)`` to keep it.
        calibration: token ids ``(N, L)``, or an iterable of batches ``{"input_ids", "attention_mask"}``.
            Padding (``attention_mask == 0``) is left out of the covariances.
        config: a :class:`SlicingConfig`, or just the sparsity (the fraction of the hidden size removed).
        **options: fields of :class:`SlicingConfig` (``rotation="global"``, ``round_to=16``...), overriding
            ``config``'s; see its field help for each.
        batch_size: calibration sequences per forward pass (for a tensor ``calibration``).
        device: where layers are computed (default: the model's device). Each layer visits it in turn.
        show_progress: show tqdm bars.
        offload: where the calibration activations wait between layers: ``None`` on ``device``, ``"cpu"`` in
            host RAM (a GPU then holds one batch at a time), ``"disk"`` in a memory-mapped temporary file (host
            RAM holds one batch at a time, in ``offload_dir``). The result is the same.
        checkpoint_dir: keep a resumable partial state here (finished blocks, the carried basis and the
            activations; safetensors and JSON), written at the end and every ``checkpoint_every`` layers.
        resume: continue from the partial state in ``checkpoint_dir`` (same model, calibration and settings);
            the result is bit-identical to an uninterrupted run's.
        hooks: research extension points (:class:`SlicingHooks`): change the plan, covariances or bases.
        source: where the dense blocks come from (default: ``model`` in memory; the low-memory path streams
            them from safetensors shards).

    Under ``torchrun`` (``torch.distributed`` initialised, e.g. by
    :func:`hf_slicegpt.runtime.distributed.init_from_environment`), each rank computes the layers on its share
    of the calibration batches and the covariances are summed over ranks; every rank returns the same model.

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
    _check_model_and_device(model, device)
    cfg = _resolve_config(config, options)
    if getattr(getattr(model, "config", None), "model_type", None) == SlicedConfig.model_type:
        done = (model.config.slicing or {}).get("sparsity")
        raise SlicingError(
            f"this model is already sliced (sparsity={done}); slice the dense original model instead, "
            "at the total sparsity wanted"
        )
    adapter = get_adapter(model.config)
    batches = calibration_batches(calibration, batch_size, model.config.vocab_size)
    offload = check_offload(offload)
    _check_checkpointing(checkpoint_dir, checkpoint_every)
    if distributed.world_size() > len(batches):
        logger.warning(
            "%d ranks but only %d calibration batches: some ranks compute nothing; lower --batch-size",
            distributed.world_size(),
            len(batches),
        )
    if device is None:
        device = model.get_input_embeddings().weight.device
    run_options = RuntimeOptions(
        torch.device(device),
        offload,
        offload_dir,
        checkpoint_dir,
        checkpoint_every,
        bool(resume),
        show_progress,
    )
    home = model.get_submodule(adapter.embed_tokens).weight.device
    source = source or InMemoryLayers(model.get_submodule(adapter.layers), home)
    run = new_run(model, adapter, cfg, run_options, source, distributed.shard(batches), batches, hooks)
    logger.info(
        "Slicing %s (%d layers, %s rotation, %s schedule) from hidden size %d to %d",
        adapter.name,
        model.config.num_hidden_layers,
        cfg.rotation,
        cfg.schedule,
        run.hidden,
        run.width,
    )
    return slice_layers(run)


__all__ = ["slice_model"]
