"""Export a globally-rotated sliced model to its family's own architecture with a smaller ``hidden_size``.

With one basis for the whole residual stream there are no shortcut matrices, and for RMSNorm families the
weightless norm with the original divisor ``D`` is exactly a family RMSNorm of width ``d`` with a constant
weight ``sqrt(D / d)`` and epsilon ``eps * D / d``:
``x / sqrt(|x|^2 / D + eps) = sqrt(D / d) * x / sqrt(|x|^2 / d + eps * D / d)``.
The result is a plain ``LlamaForCausalLM`` (etc.) that any runtime serving that architecture can load.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import get_adapter
from ..errors import SliceGPTError
from ..modeling.modeling_sliced import SlicedModelForCausalLM
from .io import write_checkpoint
from .names import NATIVE_EXPORT_KEY

logger = logging.getLogger(__name__)


class NativeExportError(SliceGPTError):
    """This sliced model cannot be written as its family's own architecture."""


def _check_exportable(sliced: SlicedModelForCausalLM) -> None:
    config = sliced.config
    settings = config.slicing or {}
    adapter = get_adapter(config.family_config)
    if adapter.norm != "rms":
        raise NativeExportError(
            f"{adapter.name} uses LayerNorm: its mean subtraction was baked into the weights and its norms became "
            "RMSNorms, which the family's own architecture cannot express. Only RMSNorm families (e.g. LLaMA, "
            "Mistral) export natively; keep the sliced (plugin) format for this model."
        )
    widths = {
        config.embedding_dim,
        config.head_input_dim,
        *config.attn_input_dims,
        *(config.mlp_input_dims or []),
    }
    if any(config.attn_shortcuts) or any(config.mlp_shortcuts or []) or len(widths) != 1:
        raise NativeExportError(
            f"only a model sliced with rotation='global' exports natively (this one used "
            f"rotation={settings.get('rotation', '?')!r}, with shortcut matrices or varying widths); re-slice "
            "with --rotation global"
        )
    if config.position_embedding_offset is not None:
        raise NativeExportError("learned absolute position embeddings cannot be exported natively")


def _native_config(sliced: SlicedModelForCausalLM, width: int):
    config = sliced.config
    family = config.family_config
    adapter = get_adapter(family)
    full = config.norm_divisor
    values = family.to_dict()
    head_dim = getattr(family, "head_dim", None) or full // family.num_attention_heads
    values.update(hidden_size=width, head_dim=head_dim, tie_word_embeddings=False)
    values[adapter.norm_eps_attr] = float(config.norm_eps) * full / width
    values.pop("model_type", None)
    try:
        native = type(family)(**values)
    except (ValueError, TypeError, StrictDataclassClassValidationError) as err:
        heads = family.num_attention_heads
        raise NativeExportError(
            f"{type(family).__name__} cannot describe hidden_size={width} with the original head size "
            f"({head_dim} x {heads} heads): {str(err).splitlines()[0]}. If it asks for a multiple of the "
            f"heads, slice with round_to={math.lcm(8, heads)} so every width is one"
        ) from err
    native._attn_implementation = family._attn_implementation
    # Marks the directory as one hf-slicegpt wrote, so that --overwrite may replace it (see io.is_own_checkpoint).
    setattr(
        native, NATIVE_EXPORT_KEY, {"format": "native", "sparsity": (config.slicing or {}).get("sparsity")}
    )
    return native


@torch.no_grad()
def to_native(sliced: SlicedModelForCausalLM) -> PreTrainedModel:
    """The family's own ``*ForCausalLM`` computing the same logits as ``sliced`` (a global-rotation model).

    The head is untied: the head reads the final norm's scale, which one vocabulary matrix shared with the
    embedding cannot carry. The input model is not modified; weights are copied.
    """
    _check_exportable(sliced)
    config = sliced.config
    adapter = get_adapter(config.family_config)
    width, full = config.embedding_dim, config.norm_divisor
    native_config = _native_config(sliced, width)
    dtype = sliced.model.embed_tokens.weight.dtype
    # Parameters on the meta device (they are all assigned below); buffers such as rotary frequencies or an
    # embedding scale are computed by the family's own code for the new width.
    with init_empty_weights(include_buffers=False):
        native = AutoModelForCausalLM.from_config(native_config, dtype=dtype)

    embed = sliced.model.embed_tokens.weight
    head_weight, head_bias = sliced.lm_head.weight, sliced.lm_head.bias
    compute = torch.float64
    if sliced.model.embed_proj is not None:
        embed = embed.to(compute) @ sliced.model.embed_proj.weight.to(compute).T
    if adapter.embedding_scale is not None:
        # The sliced embedding already carries the original scale; the native model applies its own.
        embed = embed.to(compute) / adapter.embedding_scale(native_config)
    if sliced.head_proj is not None:
        proj = sliced.head_proj
        if proj.bias is not None:
            shift = head_weight.to(compute) @ proj.bias.to(compute)
            head_bias = shift if head_bias is None else head_bias.to(compute) + shift
        head_weight = head_weight.to(compute) @ proj.weight.to(compute)
    if head_bias is not None and native.get_submodule(adapter.lm_head).bias is None:
        raise NativeExportError("the sliced head needs a bias, which this family's lm_head does not have")

    norm_value = math.sqrt(full / width) - adapter.norm_weight_offset
    state: dict[str, torch.Tensor] = {
        f"{adapter.embed_tokens}.weight": embed,
        f"{adapter.lm_head}.weight": head_weight,
        f"{adapter.final_norm}.weight": torch.full((width,), norm_value),
    }
    if head_bias is not None:
        state[f"{adapter.lm_head}.bias"] = head_bias
    norms = [adapter.attn_norm] + ([adapter.mlp_norm] if adapter.mlp_norm else [])
    for idx, block in enumerate(sliced.model.layers):
        prefix = f"{adapter.layers}.{idx}"
        for name, tensor in block.self_attn.state_dict().items():
            state[f"{prefix}.{adapter.attention}.{name}"] = tensor
        for name, tensor in block.mlp.state_dict().items():
            state[f"{prefix}.{adapter.mlp}.{name}"] = tensor
        for norm in norms:
            state[f"{prefix}.{norm}.weight"] = torch.full((width,), norm_value)
    state = {name: tensor.detach().to(dtype).clone() for name, tensor in state.items()}

    expected = native.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise NativeExportError(f"internal error: {name} has no place in {type(native).__name__}")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise NativeExportError(
                f"{type(native).__name__} cannot hold this model: {name} has shape {tuple(expected[name].shape)} "
                f"but the sliced tensor is {tuple(tensor.shape)} (the family config may not support "
                "hidden_size != num_attention_heads x head_dim)"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise NativeExportError(f"internal error: no sliced tensor for {missing}")
    native.load_state_dict(state, assign=True, strict=True)
    leftover = [
        name for name, t in list(native.named_parameters()) + list(native.named_buffers()) if t.is_meta
    ]
    if leftover:
        raise NativeExportError(f"internal error: tensors left unset in the native model: {leftover}")
    native.generation_config = sliced.generation_config
    return native.eval()


def native_round_to(family_config: Any, sparsity: float, round_to: int | None = None) -> int:
    """The ``round_to`` to slice with when a native (or GGUF) export is planned, checked before slicing.

    The family config (transformers validates it) and so llama.cpp need the sliced hidden size to be a multiple
    of the head count. Without an explicit ``round_to`` this is ``lcm(8, heads)``; an explicit one that gives a
    width the family cannot hold is refused here, naming the width and ``round_to`` to use instead, rather than
    after minutes of slicing.
    """
    from ..slicing import sliced_width

    heads = int(getattr(family_config, "num_attention_heads", 0) or 1)
    hidden = int(family_config.hidden_size)
    planned = math.lcm(8, heads)
    if round_to is None:
        width = sliced_width(hidden, sparsity, planned)
        logger.info(
            "Native export planned: widths rounded to multiples of %d (lcm(8, %d heads))", planned, heads
        )
        if width % heads:
            raise NativeExportError(f"no width that is a multiple of {heads} heads fits hidden size {hidden}")
        return planned
    width = sliced_width(hidden, sparsity, round_to)
    if width % heads:
        instead = sliced_width(hidden, sparsity, planned)
        raise NativeExportError(
            f"round_to={round_to} slices the hidden size {hidden} to {width}, which is not a multiple of the "
            f"{heads} attention heads, so neither the family's own architecture nor llama.cpp can run it; use "
            f"width {instead} (--round-to {planned}, or leave --round-to out)"
        )
    return round_to


def save_native(
    sliced: SlicedModelForCausalLM,
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Write :func:`to_native` of ``sliced`` (and the tokenizer) atomically to ``output_dir``."""
    native = to_native(sliced)

    def write(tmp: Path) -> None:
        native.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    logger.info("Exporting %s with hidden_size=%d", type(native).__name__, native.config.hidden_size)
    return write_checkpoint(output_dir, write, overwrite=overwrite)


__all__ = ["NativeExportError", "native_round_to", "save_native", "to_native"]
