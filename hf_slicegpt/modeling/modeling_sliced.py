"""The generic SliceGPT-sliced causal language model.

One architecture serves every family. Each decoder block reuses the family's own attention and MLP modules
(built from the original config, so rotary embeddings, attention backends and the KV cache are the family's),
gives their residual-side linears the sliced widths, and adds what slicing needs around them: weightless
RMSNorms whose divisor stays the original hidden size, and shortcut matrices on the residual connections.

This file is shipped beside sliced checkpoints as remote code, so it imports only torch and transformers.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_sliced import SlicedConfig

logger = logging.get_logger(__name__)


def _family_class(path: str | None) -> type[nn.Module] | None:
    """Import a family module class named in the config.

    Only classes inside ``transformers`` are accepted: a config is data, and must not make us import
    arbitrary code.
    """
    if path is None:
        return None
    module_name, _, class_name = path.rpartition(".")
    if not module_name.startswith("transformers.") or not class_name:
        raise ValueError(
            f"Refusing to build module class {path!r}: only classes from transformers are allowed"
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path!r} is not a torch module class")
    return cls


class SlicedReaderLinear(nn.Linear):
    """An ``nn.Linear`` that reads a normed residual stream, and whose output the block may hand in precomputed.

    The block computes every reader of one norm (and the shortcut on the same input) in one GEMM (see
    :class:`SlicedDecoderLayer`); the family's attention/MLP module still calls this linear, which then
    returns its slice of that product instead of multiplying again. Parameters, names and ``state_dict`` are
    exactly an ``nn.Linear``'s, so checkpoints and PEFT (which wraps ``nn.Linear``) see no difference.
    """

    precomputed: torch.Tensor | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self.precomputed
        if out is None:
            return super().forward(input)
        self.precomputed = None
        return out


def _resize_linear(
    parent: nn.Module,
    name: str,
    in_features: int | None = None,
    out_features: int | None = None,
    reader: bool = False,
):
    """Replace ``parent.<name>`` by a linear with the sliced residual-side width."""
    old = parent.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{type(parent).__name__}.{name} is a {type(old).__name__}, expected nn.Linear")
    new = (SlicedReaderLinear if reader else nn.Linear)(
        old.in_features if in_features is None else in_features,
        old.out_features if out_features is None else out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    owner_name, _, attr = name.rpartition(".")
    setattr(parent.get_submodule(owner_name) if owner_name else parent, attr, new)


_MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}
# transformers 5.24 renamed the KV cache argument and output field ``past_key_values`` to ``cache``. This code
# speaks ``cache`` and translates at the edges, so a checkpoint runs on either side of the rename.
CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _with_cache(cache: Cache | None) -> dict[str, Cache | None]:
    """``cache`` under the name this transformers uses (for masks, family modules and model outputs)."""
    return {CACHE_NAME: cache}


def attention_layer_kinds(family_config) -> list[str]:
    """The attention kind of every layer, read from the family config, never from the family's name.

    ``layer_types`` when the config has them (Qwen2/3 mix full and sliding layers); otherwise every layer uses
    a sliding window when ``sliding_window`` is set (Mistral, Phi-3) and full causal attention when it is not.
    """
    n = family_config.num_hidden_layers
    layer_types = getattr(family_config, "layer_types", None)
    if layer_types is None:
        sliding = getattr(family_config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * n
    unknown = sorted(set(layer_types) - set(_MASK_BUILDERS))
    if unknown:
        raise ValueError(
            f"layer_types {unknown} are not supported by the sliced model; supported: {sorted(_MASK_BUILDERS)}"
        )
    return list(layer_types)


def attention_masks(family_config, kinds: list[str], **mask_kwargs: Any) -> dict[str, Any]:
    """One attention mask per layer kind in ``kinds`` (``mask_kwargs`` as for ``create_causal_mask``)."""
    if "cache" in mask_kwargs:
        mask_kwargs.update(_with_cache(mask_kwargs.pop("cache")))
    return {kind: _MASK_BUILDERS[kind](config=family_config, **mask_kwargs) for kind in dict.fromkeys(kinds)}


class SlicedCheckpointError(ValueError):
    """A sliced checkpoint whose weights are missing, damaged, or do not match the widths in its config.

    transformers would re-initialise mismatched or missing tensors randomly (a silently wrong model), so a
    sliced checkpoint that does not match its ``config.json`` is refused instead.
    """


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, reading no tensor data; refuses a truncated or damaged file.

    Plain ``struct`` + ``json`` so that this remote-code file needs nothing beyond torch and transformers.
    """
    path = Path(path)
    size = path.stat().st_size
    damaged = f"{path.name} in {str(path.parent)!r} is truncated or damaged"
    hint = "(an interrupted write or download?); re-save or re-download the checkpoint"
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SlicedCheckpointError(f"{damaged}: {size} bytes, no safetensors header {hint}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise SlicedCheckpointError(f"{damaged}: its header claims {header_len} bytes {hint}")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as err:
            raise SlicedCheckpointError(f"{damaged}: unreadable header ({err}) {hint}") from err
    if not isinstance(header, dict):
        raise SlicedCheckpointError(f"{damaged}: the header is not a JSON object {hint}")
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = tuple(int(d) for d in info["shape"])
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise SlicedCheckpointError(f"{damaged}: bad header entry for {name!r} {hint}") from err
    if 8 + header_len + end > size:
        raise SlicedCheckpointError(
            f"{damaged}: {size} bytes but its tensors need {8 + header_len + end} {hint}"
        )
    return shapes


def checkpoint_weight_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Shapes of every tensor in a checkpoint directory's safetensors (one file or an index of shards).

    ``None`` when the directory holds no safetensors weights at all.
    """
    directory = Path(directory)
    if (directory / WEIGHTS_NAME).is_file():
        return read_safetensors_shapes(directory / WEIGHTS_NAME)
    index_path = directory / WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise SlicedCheckpointError(
            f"{WEIGHTS_INDEX_NAME} in {str(directory)!r} is damaged ({err}); re-save the checkpoint"
        ) from err
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        shard_path = directory / str(shard)
        if Path(str(shard)).name != str(shard) or not shard_path.is_file():
            raise SlicedCheckpointError(
                f"{WEIGHTS_INDEX_NAME} in {str(directory)!r} names the shard {shard!r}, which is missing; "
                "re-save or re-download the checkpoint"
            )
        shapes.update(read_safetensors_shapes(shard_path))
    return shapes


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

WeightReader = Callable[[str, torch.Tensor], "torch.Tensor | None"]


class SafetensorsReader:
    """Reads single tensors of a safetensors checkpoint (one file or shards) with ``pread``, not a memory map.

    A callable ``read(name, like)``: the tensor ``name`` converted to ``like``'s dtype, or ``None`` when the
    checkpoint does not hold it with ``like``'s shape (the caller then uses the parameter's own values).
    """

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        files = [directory / WEIGHTS_NAME]
        index = directory / WEIGHTS_INDEX_NAME
        if not files[0].is_file() and index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                shards = set()
            files = [
                directory / str(shard) for shard in sorted(shards) if Path(str(shard)).name == str(shard)
            ]
        self._entries: dict[str, tuple[Any, str, tuple[int, ...], int, int]] = {}
        self._handles = []
        for path in files:
            if not path.is_file():
                continue
            handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            self._handles.append(handle)
            try:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
                for name, info in header.items():
                    if name != "__metadata__":
                        begin, end = (int(x) for x in info["data_offsets"])
                        shape = tuple(int(d) for d in info["shape"])
                        self._entries[name] = (
                            handle,
                            info["dtype"],
                            shape,
                            8 + header_len + begin,
                            end - begin,
                        )
            except (ValueError, KeyError, TypeError, struct.error):
                continue  # damaged: the parameters' own values are used

    def __call__(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        handle, dtype_name, shape, offset, size = entry
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None or shape != tuple(like.shape) or size != like.numel() * dtype.itemsize:
            return None
        buffer = bytearray(size)
        if os.preadv(handle.fileno(), [buffer], offset) != size:
            return None
        return torch.frombuffer(buffer, dtype=dtype).view(shape).to(like.dtype)

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def expected_weight_shapes(config: SlicedConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The tensor shapes ``config`` implies (built on the meta device: no memory), and the tied names.

    A tied tensor (the head sharing the embedding matrix) is stored once, so its name may be absent.
    """
    with torch.device("meta"):
        model = SlicedModelForCausalLM(copy.deepcopy(config))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(SlicedModelForCausalLM._tied_weights_keys) if config.tie_word_embeddings else set()
    return shapes, tied


def weight_shape_problems(
    expected: dict[str, tuple[int, ...]], tied: set[str], found: dict[str, tuple[int, ...]]
) -> list[str]:
    """Every disagreement between the shapes a config implies and the shapes a checkpoint holds."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            if name not in tied:
                problems.append(
                    f"{name} is missing from the weights (the config expects shape {list(shape)})"
                )
        elif tuple(found[name]) != shape:
            problems.append(
                f"{name} has shape {list(found[name])} in the weights but the config implies {list(shape)}"
            )
    problems.extend(
        f"{name} (shape {list(found[name])}) is in the weights but the config has no place for it"
        for name in found
        if name not in expected
    )
    return problems


def checkpoint_mismatch_error(where: str, problems: list[str]) -> SlicedCheckpointError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return SlicedCheckpointError(
        f"sliced checkpoint {where} does not match its config.json: {problems[0]}{more}. The per-layer widths "
        "in config.json (attn_input_dims, mlp_input_dims, embedding_dim, head_input_dim, *_shortcuts) must "
        "describe these weights; was config.json edited, or do the weights come from another checkpoint?"
    )


def check_checkpoint_weights(directory: str | os.PathLike, config: SlicedConfig) -> None:
    """Refuse a sliced checkpoint directory whose safetensors are damaged or disagree with ``config``."""
    found = checkpoint_weight_shapes(directory)
    if found is None:
        raise SlicedCheckpointError(
            f"sliced checkpoint {str(directory)!r} has no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}); sliced "
            "weights load only from safetensors"
        )
    problems = weight_shape_problems(*expected_weight_shapes(config), found)
    if problems:
        raise checkpoint_mismatch_error(repr(str(directory)), problems)


class SlicedRMSNorm(nn.Module):
    """Weightless RMSNorm: ``x / sqrt(|x|^2 / D + eps)`` with ``D`` the *original* hidden size.

    After slicing, ``|x|^2`` is the energy kept in the sliced basis, and dividing by the original ``D`` keeps
    the norm equal to the dense model's on the kept directions.
    """

    def __init__(self, divisor: int, eps: float):
        super().__init__()
        self.divisor = divisor
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.normed_and_inverse(hidden_states)[0]

    def normed_and_inverse(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``N(x)`` and the float32 ``1 / rms(x)`` per token (shape ``(..., 1)``) it was scaled by: the norm is
        weightless, so a product of ``x`` is that of ``N(x)`` divided by it."""
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        inverse = torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.divisor + self.eps)
        return (x * inverse).to(dtype), inverse

    def extra_repr(self) -> str:
        return f"divisor={self.divisor}, eps={self.eps}"


class SlicedFeedForward(nn.Module):
    """``fc2(act(fc1(x)))``, for families whose MLP is not a module of its own (OPT)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, activation: str, bias: bool):
        super().__init__()
        self.fc1 = SlicedReaderLinear(in_features, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias)
        self.act = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class _FusedGroup:
    """One norm's readers (and the shortcut on the same input) as one matrix whose columns the modules' weights view.

    ``weight_t`` is ``[W_readers; S]^T``, stored input-major (``[in, out]``, contiguous): a token's product is
    then ``x @ weight_t``, a sum of contiguous weight rows scaled by ``x``. On CPU, for one token (decode), that
    form streams the weights about twice as fast as ``nn.Linear``'s row dot products (``x W^T``) at these shapes
    (measured in BENCHMARKS.md, Inference); for a prefill both are GEMMs of equal speed. ``weight`` is its
    ``nn.Linear``-layout view. After fusing, each module's ``weight`` (a transposed column block of
    ``weight_t``) and each reader's ``bias`` are views of it, so the model holds every weight once and in-place
    updates (``load_state_dict``, merging an adapter) reach the fused matrix too. ``pointers`` records where
    those views start: when a parameter has been moved or replaced since (``.to()``, ``assign=True``), they
    differ and the group is fused again. ``params`` are the parameter objects that were fused: under
    ``torch.compile``, where ``data_ptr`` cannot be traced, the group is used only while the modules still hold
    exactly those (``.to()`` forgets every group, ``load_state_dict`` copies into the views).
    """

    __slots__ = ("weight_t", "bias", "sizes", "reader_rows", "pointers", "params")

    def __init__(self, weight_t, bias, sizes, reader_rows, pointers, params):
        self.weight_t: torch.Tensor = weight_t
        self.bias: torch.Tensor | None = bias
        self.sizes: list[int] = sizes
        self.reader_rows: int = reader_rows
        self.pointers: tuple[int, ...] = pointers
        self.params: tuple[torch.Tensor, ...] = params

    @property
    def weight(self) -> torch.Tensor:
        """``[W_readers; S]`` in ``nn.Linear`` layout (a view)."""
        return self.weight_t.t()

    def holds(self, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` are the very parameters this group fused (traceable: identity only)."""
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))


def _group_params(readers: list[nn.Module], shortcut: nn.Module | None) -> list[torch.Tensor]:
    """A group's parameters in fusing order: the readers' and shortcut's weights, then the readers' biases."""
    weights = [m.weight for m in readers] + ([shortcut.weight] if shortcut is not None else [])
    return weights + [m.bias for m in readers if m.bias is not None]


def _group_pointers(params: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in params)


def _fusable(readers: list[nn.Module], shortcut: nn.Module | None) -> bool:
    """True when every module is still the plain one this file built (not wrapped by PEFT, a quantizer or
    an offloading hook) and their weights can share one matrix."""
    if not readers or any(type(m) is not SlicedReaderLinear for m in readers):
        return False
    if shortcut is not None and type(shortcut) is not nn.Linear:
        return False
    modules = readers + ([shortcut] if shortcut is not None else [])
    if any(hasattr(m, "_hf_hook") for m in modules):
        return False
    if len({m.bias is None for m in readers}) != 1:
        return False
    weight = readers[0].weight
    return all(
        m.weight.device == weight.device and m.weight.dtype == weight.dtype and m.weight.device.type != "meta"
        for m in modules
    )


class SlicedDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm block around the family's attention and MLP, with shortcut matrices on its residuals.

    Sequential: ``h = x S_attn + Attn(N(x))``; ``y = h S_mlp + MLP(N(h))``.
    Parallel:   ``y = x S + Attn(N(x)) + MLP(N(x))``.

    At inference (gradients off) the block runs *fused*: the norm is weightless, so ``x S = (N(x) S) rms(x)``,
    and all readers of one norm plus the shortcut on the same input are one GEMM on the normed stream,
    ``N(x) [W_q; W_k; W_v; S]^T``, whose shortcut columns are then scaled back by ``rms(x)`` (and whose reader
    columns get their bias). The family's modules receive their slices of that product through
    :class:`SlicedReaderLinear`. This saves a GEMM launch and a read of the stream per shortcut. The weights
    are fused on first use (``from_pretrained`` fuses at load, ``.to()`` again); the checkpoint format and
    parameter names do not change. ``torch.compile`` traces the fused path of groups fused before it (a trace
    never fuses). The plain path runs whenever gradients are on, when PEFT or anything else wraps one of these
    linears, when a compiled block was not fused beforehand, or when ``fused_inference`` is ``False``. With
    ``"auto"`` (the default), an eager forward fuses the weights but runs the plain path; only a compiled
    forward runs fused (see :meth:`SlicedModelForCausalLM.set_fused_inference`).
    """

    def __init__(self, config: SlicedConfig, layer_idx: int):
        super().__init__()
        family = config.family_config
        self.layer_idx = layer_idx
        self.parallel = config.topology == "parallel"
        self.fused_inference: bool | str = "auto"
        self._fused: dict[str, _FusedGroup] = {}
        d_in = config.attn_input_dims[layer_idx]
        d_out = config.layer_output_dim(layer_idx)
        d_mid = d_in if self.parallel else config.mlp_input_dims[layer_idx]
        attn_writes = d_out if self.parallel else d_mid

        self.input_layernorm = SlicedRMSNorm(config.norm_divisor, config.norm_eps)
        self.self_attn = _family_class(config.attention_class)(config=family, layer_idx=layer_idx)
        self.cache_kwarg = config.attention_cache_kwarg
        self._attn_readers = list(config.attn_input_names)
        for name in config.attn_input_names:
            _resize_linear(self.self_attn, name, in_features=d_in, reader=True)
        _resize_linear(self.self_attn, config.attn_output_name, out_features=attn_writes)

        mlp_cls = _family_class(config.mlp_class)
        if mlp_cls is None:
            self.mlp = SlicedFeedForward(
                d_mid, family.ffn_dim, d_out, config.mlp_activation, bias=getattr(family, "enable_bias", True)
            )
            self._mlp_readers = ["fc1"]
        else:
            self.mlp = mlp_cls(family)
            self._mlp_readers = list(config.mlp_input_names)
            for name in config.mlp_input_names:
                _resize_linear(self.mlp, name, in_features=d_mid, reader=True)
            _resize_linear(self.mlp, config.mlp_output_name, out_features=d_out)

        self.attn_shortcut = (
            nn.Linear(d_in, attn_writes, bias=False) if config.attn_shortcuts[layer_idx] else None
        )
        if self.parallel:
            self.post_attention_layernorm = None
            self.mlp_shortcut = None
        else:
            self.post_attention_layernorm = SlicedRMSNorm(config.norm_divisor, config.norm_eps)
            self.mlp_shortcut = (
                nn.Linear(d_mid, d_out, bias=False) if config.mlp_shortcuts[layer_idx] else None
            )

    # -- fused inference ----------------------------------------------------------------------------------------

    def _group_modules(self, group: str) -> tuple[list[nn.Module], nn.Module | None]:
        """The readers of one norm (looked up each time: PEFT may have replaced them) and its shortcut."""
        readers = [self.self_attn.get_submodule(name) for name in self._attn_readers]
        if group == "attn" and not self.parallel:
            return readers, self.attn_shortcut
        mlp = [self.mlp.get_submodule(name) for name in self._mlp_readers]
        if group == "mlp":
            return mlp, self.mlp_shortcut
        return readers + mlp, self.attn_shortcut

    def _group_names(self, group: str) -> tuple[list[str], str | None]:
        """Module paths (relative to this layer) of ``group``'s readers, and of its shortcut."""
        attn = [f"self_attn.{name}" for name in self._attn_readers]
        mlp = [f"mlp.{name}" for name in self._mlp_readers]
        if group == "attn":
            return attn, "attn_shortcut" if self.attn_shortcut is not None else None
        if group == "mlp":
            return mlp, "mlp_shortcut" if self.mlp_shortcut is not None else None
        return attn + mlp, "attn_shortcut" if self.attn_shortcut is not None else None

    def _fuse_group(
        self, group: str, readers: list[nn.Module], shortcut: nn.Module | None, read: WeightReader | None
    ) -> _FusedGroup:
        """Concatenate the weights into one matrix and make every parameter a view of it (memory-neutral).

        ``read(name, like)`` may supply a tensor's values from the checkpoint file instead of the parameter: after
        ``from_pretrained`` the parameters view a memory map of the file, and copying them out of it would leave
        their pages resident beside the fused copy.
        """
        reader_names, shortcut_name = self._group_names(group)
        prefix = f"model.layers.{self.layer_idx}."
        names = reader_names + ([shortcut_name] if shortcut_name else [])
        modules = readers + ([shortcut] if shortcut is not None else [])
        weights = [m.weight for m in modules]
        biases = [(f"{prefix}{n}.bias", m.bias) for n, m in zip(reader_names, readers) if m.bias is not None]

        def concatenate(tensors: list[tuple[str, torch.Tensor]], input_major: bool) -> torch.Tensor:
            """Stack the tensors' rows (as columns when ``input_major``) and make each tensor a view of its block."""
            first = tensors[0][1]
            rows = sum(t.shape[0] for _, t in tensors)
            shape = (*first.shape[1:], rows) if input_major else (rows, *first.shape[1:])
            fused = torch.empty(shape, dtype=first.dtype).to(first.device)
            start = 0
            for name, tensor in tensors:
                values = read(name, tensor) if read is not None else None
                stop = start + tensor.shape[0]
                block = fused[:, start:stop].t() if input_major else fused[start:stop]
                block.copy_(tensor.detach() if values is None else values)
                tensor.data = block
                start = stop
            return fused

        # Outside inference mode, so that the parameters stay usable for training afterwards.
        with torch.inference_mode(False), torch.no_grad():
            fused = concatenate(
                [(f"{prefix}{n}.weight", w) for n, w in zip(names, weights)], input_major=True
            )
            fused_bias = concatenate(biases, input_major=False) if biases else None
        sizes = [m.weight.shape[0] for m in readers]
        params = _group_params(readers, shortcut)
        return _FusedGroup(fused, fused_bias, sizes, sum(sizes), _group_pointers(params), tuple(params))

    def _fused_group(
        self, group: str, read: WeightReader | None = None
    ) -> tuple[_FusedGroup, list[nn.Module]] | None:
        """The fused matrix of ``group`` (fusing it first if needed), or ``None`` where the plain path must run."""
        if torch.is_grad_enabled() or not self.fused_inference:
            return None
        if torch.compiler.is_compiling():
            return self._traced_group(group)
        readers, shortcut = self._group_modules(group)
        for module in readers:
            if type(module) is nn.Linear:  # modules handed over by the slicer: same state, one more ability
                module.__class__ = SlicedReaderLinear
        if not _fusable(readers, shortcut):
            self._fused.pop(group, None)
            return None
        entry = self._fused.get(group)
        if entry is not None and _group_pointers(_group_params(readers, shortcut)) != entry.pointers:
            entry = None
        if entry is None:
            self._fused.pop(group, None)  # drop a stale matrix before building the new one
            entry = self._fused[group] = self._fuse_group(group, readers, shortcut, read)
        # With "auto" an eager forward runs plain: the readers' separate GEMMs, whose outputs the elementwise work
        # after them reads contiguously, won at every eager shape measured, on the CPU (prefill 1 x 8 to 8 x 512,
        # decode) and on a GPU (BENCHMARKS.md, "Fused or plain"). The group stays fused (views, no extra memory)
        # for torch.compile, whose trace runs it fused.
        return None if self.fused_inference == "auto" else (entry, readers)

    def _traced_group(self, group: str) -> tuple[_FusedGroup, list[nn.Module]] | None:
        """Under ``torch.compile``: a group fused before tracing (``from_pretrained``, :meth:`fuse`, or an eager
        forward), while its modules are unchanged; a trace never fuses (that mutates the parameters)."""
        entry = self._fused.get(group)
        readers, shortcut = self._group_modules(group)
        if (
            entry is None
            or not _fusable(readers, shortcut)
            or not entry.holds(_group_params(readers, shortcut))
        ):
            return None
        return entry, readers

    def fuse(self, read: WeightReader | None = None) -> None:
        """Fuse now rather than on the first inference forward (a no-op where the plain path must run)."""
        with torch.no_grad():
            for group in ("block",) if self.parallel else ("attn", "mlp"):
                self._fused_group(group, read)

    def _run_fused(
        self, fused: tuple[_FusedGroup, list[nn.Module]], hidden_states: torch.Tensor, norm: SlicedRMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One GEMM for the readers and the shortcut; hands each reader its output; returns ``N(x)`` and ``x S``
        (or None).

        The GEMM reads the normed stream, as the readers do, and only the shortcut's columns are scaled back by
        ``rms(x)``: the elementwise work then spans the shortcut's width, not all the readers' (2 to 7 times
        wider: 2 for the attention, 7 for the MLP's gate and up), which on a GPU cost more than the fusion saved."""
        entry, readers = fused
        normed, inverse = norm.normed_and_inverse(hidden_states)
        product = torch.matmul(normed, entry.weight_t)
        reads = product[..., : entry.reader_rows]
        if entry.bias is not None:
            reads.add_(entry.bias)
        start = 0
        for module, size in zip(readers, entry.sizes):
            module.precomputed = reads[..., start : start + size]
            start += size
        if entry.weight_t.shape[1] == entry.reader_rows:
            return normed, None
        return normed, product[..., entry.reader_rows :].div_(inverse)

    @staticmethod
    def _clear(readers: list[nn.Module]) -> None:
        for module in readers:
            module.precomputed = None

    def _apply(self, fn, recurse: bool = True):
        # .to()/.half()/... give the parameters new storage: forget the fused matrices rather than hold them
        # twice, then fuse the moved parameters again, so that a torch.compile after .to("cuda") still traces
        # the fused path (a trace never fuses).
        was_fused = bool(self._fused)
        self._fused.clear()
        result = super()._apply(fn, recurse)
        if was_fused:
            self.fuse()
        return result

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_fused"] = {}
        return state

    # -- forward --------------------------------------------------------------------------------------------

    def _attention(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if kwargs.get("position_embeddings") is None:
            kwargs.pop("position_embeddings", None)
        cache_kwarg = CACHE_NAME if self.cache_kwarg == "cache" else self.cache_kwarg
        if cache_kwarg != "cache":
            kwargs[cache_kwarg] = kwargs.pop("cache", None)
        output = self.self_attn(hidden_states=hidden_states, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        fused = self._fused_group("block" if self.parallel else "attn")
        if fused is None:
            residual = hidden_states if self.attn_shortcut is None else self.attn_shortcut(hidden_states)
            normed = self.input_layernorm(hidden_states)
            attn_output = self._attention(normed, **attn_kwargs)
            if self.parallel:
                return residual + attn_output + self.mlp(normed)
        else:
            try:
                normed, shortcut = self._run_fused(fused, hidden_states, self.input_layernorm)
                residual = hidden_states if shortcut is None else shortcut
                # The readers return their precomputed slices (the modules still see their true input).
                attn_output = self._attention(normed, **attn_kwargs)
                if self.parallel:
                    return residual + attn_output + self.mlp(normed)
            finally:
                self._clear(fused[1])
        hidden_states = residual + attn_output
        fused = self._fused_group("mlp")
        if fused is None:
            residual = hidden_states if self.mlp_shortcut is None else self.mlp_shortcut(hidden_states)
            return residual + self.mlp(self.post_attention_layernorm(hidden_states))
        try:
            normed, shortcut = self._run_fused(fused, hidden_states, self.post_attention_layernorm)
            residual = hidden_states if shortcut is None else shortcut
            return residual + self.mlp(normed)
        finally:
            self._clear(fused[1])


class SlicedPreTrainedModel(PreTrainedModel):
    config_class = SlicedConfig
    config: SlicedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlicedDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False


class SlicedModel(SlicedPreTrainedModel):
    """Embeddings, sliced decoder blocks and the final weightless norm."""

    def __init__(self, config: SlicedConfig):
        super().__init__(config)
        family = config.family_config
        self.padding_idx = getattr(family, "pad_token_id", None)
        full = config.norm_divisor
        # With tied embeddings the vocabulary matrix is stored once at full width; a small projection maps it
        # into the first basis, and the head projects back out of the last one.
        embed_width = full if config.embed_proj else config.embedding_dim
        self.embed_tokens = nn.Embedding(family.vocab_size, embed_width, self.padding_idx)
        self.embed_proj = nn.Linear(full, config.embedding_dim, bias=False) if config.embed_proj else None
        if config.position_embedding_offset is not None:
            num_positions = family.max_position_embeddings + config.position_embedding_offset
            self.embed_positions = nn.Embedding(num_positions, config.embedding_dim)
        else:
            self.embed_positions = None
        rotary_cls = _family_class(config.rotary_class)
        self.rotary_emb = rotary_cls(config=family) if rotary_cls is not None else None
        self.layers = nn.ModuleList(
            [SlicedDecoderLayer(config, layer_idx) for layer_idx in range(family.num_hidden_layers)]
        )
        # Full or sliding-window attention per layer, as the family's own model masks them.
        self.layer_kinds = attention_layer_kinds(family)
        self.norm = SlicedRMSNorm(config.norm_divisor, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        legacy_cache = kwargs.pop("past_key_values", None)  # the name before transformers 5.24
        cache = legacy_cache if cache is None else cache
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        family = self.config.family_config
        if family._attn_implementation != self.config._attn_implementation:
            # The family's attention modules read their backend from the family config.
            family._attn_implementation = self.config._attn_implementation
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", False) and not self.training
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.embed_proj(inputs_embeds) if self.embed_proj is not None else inputs_embeds

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # Read only when needed: a static cache's length is a Python int that torch.compile would guard on.
        past_seen = cache.get_seq_length() if cache is not None and position_ids is None else 0

        if self.embed_positions is not None:
            # Learned absolute positions count only real tokens, so left padding does not shift them.
            if position_ids is None:
                mask = attention_mask
                if mask is None:
                    mask = torch.ones(
                        hidden_states.shape[0],
                        past_seen + hidden_states.shape[1],
                        device=hidden_states.device,
                    )
                position_ids = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, past_seen:]
            positions = self.embed_positions(position_ids + self.config.position_embedding_offset)
            hidden_states = hidden_states + positions.to(hidden_states.dtype)
        elif position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        masks = attention_masks(
            self.config.family_config,
            self.layer_kinds,
            inputs_embeds=hidden_states,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = (
            self.rotary_emb(hidden_states, position_ids=position_ids) if self.rotary_emb else None
        )

        for layer, kind in zip(self.layers, self.layer_kinds):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, **_with_cache(cache if use_cache else None)
        )


class SlicedModelForCausalLM(SlicedPreTrainedModel, GenerationMixin):
    """A SliceGPT-sliced causal LM that loads with ``AutoModelForCausalLM.from_pretrained``.

    Example (after ``import hf_slicegpt``):

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    >>> import hf_slicegpt
    >>> dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, vocab_size=128))
    >>> sliced = hf_slicegpt.slice_model(dense, torch.randint(0, 128, (8, 16)), sparsity=0.25, round_to=4)
    >>> sliced.config.attn_input_dims
    [24, 24]
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Set by ``import hf_slicegpt``: called with the directory after every save, to (re)write the model card
    # from config.json (base model, license, source). Remote code without the plugin writes no card.
    card_writer: Callable[[str | os.PathLike], Any] | None = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``, then the model card (with the plugin; see ``card_writer``).

        Fused weights are interleaved column blocks of one matrix, which transformers would take for tensors that
        share memory and refuse; they are written from contiguous copies (transformers copied them before too).
        """
        if len(args) < 2:
            state_dict = kwargs.get("state_dict")
            state_dict = self.state_dict() if state_dict is None else state_dict
            if any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in state_dict.values()):
                kwargs["state_dict"] = {
                    k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()
                }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        is_main = kwargs.get("is_main_process", args[0] if args else True)
        writer = type(self).card_writer
        if writer is not None and is_main and os.path.isdir(save_directory):
            writer(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, refusing weights that do not match the config.

        transformers would re-initialise a missing or mismatched tensor randomly and only warn; for a sliced
        checkpoint that is a silently wrong model, so it raises :class:`SlicedCheckpointError` instead. A local
        directory is checked from its safetensors headers before any weight is read. Weights load only from
        safetensors (never a pickle). ``ignore_mismatched_sizes=True`` turns the checks off.
        """
        lenient = bool(kwargs.get("ignore_mismatched_sizes", False))
        kwargs.setdefault("use_safetensors", True)
        if lenient:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        local = pretrained_model_name_or_path is not None and os.fspath(pretrained_model_name_or_path) != ""
        directory = Path(os.fspath(pretrained_model_name_or_path or "."), kwargs.get("subfolder") or "")
        if (
            local
            and kwargs.get("state_dict") is None
            and kwargs.get("gguf_file") is None
            and directory.is_dir()
        ):
            config = kwargs.get("config")
            if not isinstance(config, SlicedConfig):
                config = SlicedConfig.from_pretrained(directory)
            check_checkpoint_weights(directory, config)
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # mismatches are reported below, by name, as one error
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        problems = [
            f"{name} has shape {list(found)} in the weights but the config implies {list(shape)}"
            for name, found, shape in sorted(info.get("mismatched_keys") or ())
        ]
        problems += [f"{name} is missing from the weights" for name in sorted(info.get("missing_keys") or ())]
        problems += [
            f"{name} is in the weights but the config has no place for it"
            for name in sorted(info.get("unexpected_keys") or ())
        ]
        if problems:
            raise checkpoint_mismatch_error(repr(str(pretrained_model_name_or_path)), problems)
        if local and kwargs.get("state_dict") is None and kwargs.get("gguf_file") is None:
            model._fuse_loaded(directory)
        return (model, info) if wants_info else model

    def __init__(self, config: SlicedConfig):
        super().__init__(config)
        self.model = SlicedModel(config)
        vocab = config.family_config.vocab_size
        self.vocab_size = vocab
        if config.head_proj:
            # Maps the last basis through the final norm's scale into the (tied) vocabulary matrix's space.
            self.head_proj = nn.Linear(
                config.head_input_dim, config.head_proj_dim, bias=config.head_proj_bias
            )
            head_width = config.head_proj_dim
        else:
            self.head_proj = None
            head_width = config.head_input_dim
        self.lm_head = nn.Linear(head_width, vocab, bias=config.lm_head_bias)
        self.post_init()

    def fuse(self, read: WeightReader | None = None) -> SlicedModelForCausalLM:
        """Fuse every block's readers and shortcuts now instead of on the first inference forward.

        Memory-neutral (the parameters become views of the fused matrices) and invisible to ``state_dict``.
        Call it before ``torch.compile`` on a model built in this process (``from_pretrained`` fuses at load,
        ``.to()`` fuses again what was fused, and so does an eager inference forward): a trace uses fused groups
        but never fuses.
        """
        for layer in self.model.layers:
            layer.fuse(read)
        return self

    def _fuse_loaded(self, directory: Path | None = None) -> SlicedModelForCausalLM:
        """Fuse right after ``from_pretrained``, reading the fused weights from the checkpoint file.

        transformers memory-maps the safetensors file and the parameters view the map, whose pages become
        resident as they are touched. Copying the readers out of the map would keep their pages resident beside
        the fused copies (the sliced model's peak memory then exceeded the dense one's); reading them from the
        file with ``pread`` goes through the page cache instead, so each weight is held once.
        """
        if not isinstance(self, SlicedModelForCausalLM) or directory is None or not directory.is_dir():
            return self  # fused on the first inference forward
        if any(p.device.type != "cpu" for p in self.parameters()):
            with torch.inference_mode(False):  # loaded onto a GPU (device_map): no memory map to spare
                return self.fuse()
        with SafetensorsReader(directory) as read, torch.inference_mode(False), torch.no_grad():
            self.fuse(read)
        return self

    def set_fused_inference(self, enabled: bool | str) -> None:
        """Turn the fused inference path (see :class:`SlicedDecoderLayer`) on or off; both give the same logits.

        ``"auto"`` (the default) runs it under ``torch.compile`` only: an eager forward runs the plain path,
        whose separate GEMMs give the elementwise work after them contiguous inputs, and which was faster at
        every eager shape measured, on the CPU and on a GPU (BENCHMARKS.md, "Fused or plain"). The weights stay
        fused (views of one matrix, no extra memory), also after ``.to()``, so that a compiled model runs fused:
        compiled batch-1 decode is where the fused groups win. ``True`` forces the fused path eagerly too.
        """
        if enabled != "auto" and enabled not in (True, False):  # 1 and 0 pass, as they did
            raise ValueError(f"fused inference must be True, False or 'auto', got {enabled!r}")
        for layer in self.model.layers:
            layer.fused_inference = enabled if enabled == "auto" else bool(enabled)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        legacy_cache = kwargs.pop("past_key_values", None)  # the name before transformers 5.24
        cache = legacy_cache if cache is None else cache
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        if self.head_proj is not None:
            hidden_states = self.head_proj(hidden_states)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **_with_cache(getattr(outputs, CACHE_NAME)))


__all__ = [
    "SlicedCheckpointError",
    "SlicedModel",
    "SlicedModelForCausalLM",
    "SlicedPreTrainedModel",
    "SlicedDecoderLayer",
    "SlicedReaderLinear",
    "SlicedRMSNorm",
    "check_checkpoint_weights",
    "checkpoint_mismatch_error",
    "checkpoint_weight_shapes",
    "expected_weight_shapes",
    "read_safetensors_shapes",
    "weight_shape_problems",
]
