"""Configuration of the generic SliceGPT-sliced causal language model.

This file is shipped beside sliced checkpoints as remote code, so it imports only ``transformers``.
The config is complete: together with ``family_config`` (the original model's config) it holds every
per-layer width, so ``from_pretrained`` can build the model on the meta device from ``config.json`` alone.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Family attributes copied onto the top-level config: generation, the KV cache and tools such as PEFT or
# lm-eval read them from ``model.config``. These stay writable: token ids and the vocabulary size are changed
# by ordinary user code (``resize_token_embeddings``, setting a pad token).
_MIRRORED_ATTRIBUTES = (
    "vocab_size",
    "num_hidden_layers",
    "sliding_window",
    "layer_types",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
# Standard fields that describe the parts slicing leaves untouched (attention heads, MLP width, RoPE, norms).
# Tools that size or serve a model (lm-eval, vLLM, memory estimators) read them at the top level, so they are
# exposed there, read-only: each is a property over ``family_config``, which stays the one source of truth.
# A field the family lacks (OPT has no ``intermediate_size``) is absent here too, as it is on the dense config.
FAMILY_FIELDS = (
    "intermediate_size",
    "ffn_dim",
    "hidden_act",
    "activation_function",
    "rms_norm_eps",
    "layer_norm_eps",
    "rope_parameters",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
)
# The attribute under which a loader records where a dense model came from (see ``SlicedConfig.provenance``).
PROVENANCE_ATTRIBUTE = "hf_slicegpt_provenance"
_PROVENANCE_KEYS = ("base_model", "license", "source_format", "source_file", "quantization")


class ReadOnlyFieldError(ValueError):
    """A standard field of a sliced config was given a value that disagrees with ``family_config``."""


def _family_field(name: str) -> property:
    def getter(self: SlicedConfig) -> Any:
        family = self.__dict__.get("family_config")
        if family is None or isinstance(family, dict):
            raise AttributeError(name)
        return getattr(family, name)

    def setter(self: SlicedConfig, value: Any) -> None:
        # Loading a config.json that carries these fields (and transformers' own RoPE standardisation) assigns
        # them; an equal value is accepted, a different one would make the two copies disagree.
        family = self.__dict__.get("family_config")
        missing = object()
        current = missing if family is None or isinstance(family, dict) else getattr(family, name, missing)
        if current is missing or value != current:
            mirrored = "which it lacks" if current is missing else f"({current!r})"
            raise ReadOnlyFieldError(
                f"SlicedConfig.{name} is read-only: it mirrors family_config.{name} {mirrored}, got {value!r}; "
                f"set family_config.{name} instead"
            )

    return property(getter, setter, doc=f"``family_config.{name}`` (read-only).")


class SlicedConfig(PreTrainedConfig):
    r"""Config of a [`SlicedModelForCausalLM`].

    Widths follow the residual stream. Layer ``l`` reads a stream of width ``attn_input_dims[l]``; in a
    sequential block its MLP reads ``mlp_input_dims[l]``; it writes ``attn_input_dims[l + 1]`` (or
    ``head_input_dim`` after the last layer). A shortcut matrix sits on a residual connection whenever its two
    ends use different bases; ``False`` means the identity (same basis, equal widths).

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from hf_slicegpt import SlicedConfig
    >>> family = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, vocab_size=128)
    >>> config = SlicedConfig.from_family_config(family, attn_input_dims=[24, 24], mlp_input_dims=[24, 24],
    ...     head_input_dim=24, embedding_dim=24)
    >>> config.attn_input_dims
    [24, 24]
    ```
    """

    model_type = "slicegpt"
    sub_configs_defaults = {"family_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    family_config: dict | PreTrainedConfig | None = None
    topology: str = "sequential"
    hidden_size: int | None = None
    norm_divisor: int | None = None
    norm_eps: float = 1e-5
    embedding_dim: int | None = None
    attn_input_dims: list[int] | None = None
    mlp_input_dims: list[int] | None = None
    head_input_dim: int | None = None
    attn_shortcuts: list[bool] | None = None
    mlp_shortcuts: list[bool] | None = None
    embed_proj: bool = False
    head_proj: bool = False
    head_proj_dim: int | None = None
    head_proj_bias: bool = False
    lm_head_bias: bool = False
    tie_word_embeddings: bool = False
    position_embedding_offset: int | None = None
    attention_class: str | None = None
    mlp_class: str | None = None
    rotary_class: str | None = None
    mlp_activation: str | None = None
    attention_module: str = "self_attn"
    # The keyword under which the family's attention module takes the KV cache (GPT-NeoX: ``layer_past``).
    attention_cache_kwarg: str = "cache"
    attn_input_names: list[str] | None = None
    attn_output_name: str | None = None
    mlp_input_names: list[str] | None = None
    mlp_output_name: str | None = None
    slicing: dict[str, Any] | None = None
    # Where the dense weights came from: ``base_model`` (Hub id), ``license``, ``source_format`` (``gguf`` or
    # ``safetensors``), ``source_file`` (a file name, never a path) and ``quantization`` (e.g. ``Q4_1``, the
    # GGUF type the weights were dequantised from). Kept in config.json so every re-save carries it.
    provenance: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        family_attn = getattr(self.family_config, "_attn_implementation", None)
        # Seen before the base class builds the family sub-config, which copies neither attribute.
        family_provenance = getattr(self.family_config, PROVENANCE_ATTRIBUTE, None)
        if isinstance(self.family_config, dict):
            family_provenance = self.family_config.get(PROVENANCE_ATTRIBUTE, family_provenance)
        super().__post_init__(**kwargs)
        family = self.family_config
        if self.provenance is None and isinstance(family_provenance, dict):
            self.provenance = {k: family_provenance.get(k) for k in _PROVENANCE_KEYS}
        # The base class resets sub-configs' attention backend; keep the family's unless one was asked for.
        if self._attn_implementation is None and family_attn is not None:
            self._attn_implementation = family_attn
        for name in _MIRRORED_ATTRIBUTES:
            if getattr(self, name, None) is None and getattr(family, name, None) is not None:
                setattr(self, name, getattr(family, name))
        if self.hidden_size is None:
            self.hidden_size = family.hidden_size
        if self.norm_divisor is None:
            self.norm_divisor = family.hidden_size
        n = family.num_hidden_layers
        if self.num_hidden_layers != n:  # the KV cache and generation size themselves by the top-level count
            raise ValueError(
                f"num_hidden_layers is {self.num_hidden_layers!r} but family_config.num_hidden_layers is {n!r}: the "
                f"sliced model has {n} layers; set both to {n} (an edited config.json?)"
            )
        if self.attn_input_dims is None:
            self.attn_input_dims = [family.hidden_size] * n
        if self.embedding_dim is None:
            self.embedding_dim = self.attn_input_dims[0] if self.attn_input_dims else family.hidden_size
        if self.head_input_dim is None:
            self.head_input_dim = family.hidden_size
        if self.head_proj_dim is None:
            self.head_proj_dim = self.norm_divisor
        if self.topology == "sequential" and self.mlp_input_dims is None:
            self.mlp_input_dims = [family.hidden_size] * n
        if self.attn_shortcuts is None:
            self.attn_shortcuts = [True] * n
        if self.mlp_shortcuts is None:
            self.mlp_shortcuts = [True] * n if self.topology == "sequential" else []
        self.validate_widths()

    def to_dict(self) -> dict[str, Any]:
        """The serialised config, with the standard family fields at the top level and no local paths.

        ``_name_or_path`` records where a config was loaded from (for a dequantised GGUF, a site-packages
        directory): it means nothing on another machine, so neither this config nor its family config writes it.
        """
        output = super().to_dict()
        family = output.get("family_config")
        if isinstance(family, dict):
            family.pop("_name_or_path", None)
            family.pop(PROVENANCE_ATTRIBUTE, None)
        output.pop("_name_or_path", None)
        for name in FAMILY_FIELDS:
            try:
                value = getattr(self, name)
            except AttributeError:
                continue
            output[name] = copy.deepcopy(value)
        return output

    @classmethod
    def from_family_config(cls, family_config: PreTrainedConfig, **kwargs: Any) -> SlicedConfig:
        """Build a sliced config around a family config (a transformers config object)."""
        return cls(family_config=family_config, **kwargs)

    def layer_output_dim(self, layer_idx: int) -> int:
        """Width of the residual stream written by layer ``layer_idx``."""
        if layer_idx + 1 < len(self.attn_input_dims):
            return self.attn_input_dims[layer_idx + 1]
        return self.head_input_dim

    def validate_widths(self) -> None:
        """Refuse widths that cannot describe a sliced model, naming the field and the fix."""
        n = self.family_config.num_hidden_layers
        full = self.norm_divisor
        if self.topology not in ("sequential", "parallel"):
            raise ValueError(f"topology must be 'sequential' or 'parallel', got {self.topology!r}")
        lists = {"attn_input_dims": self.attn_input_dims, "attn_shortcuts": self.attn_shortcuts}
        if self.topology == "sequential":
            lists.update(mlp_input_dims=self.mlp_input_dims, mlp_shortcuts=self.mlp_shortcuts)
        for name, values in lists.items():
            if not isinstance(values, list) or len(values) != n:
                raise ValueError(
                    f"SlicedConfig.{name} must be a list with one entry per layer ({n}), got {values!r}"
                )
        widths = {"embedding_dim": [self.embedding_dim], "head_input_dim": [self.head_input_dim]}
        widths["attn_input_dims"] = self.attn_input_dims
        if self.topology == "sequential":
            widths["mlp_input_dims"] = self.mlp_input_dims
        for name, values in widths.items():
            for i, width in enumerate(values):
                if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= full:
                    where = f"{name}[{i}]" if len(values) > 1 or name.endswith("dims") else name
                    raise ValueError(
                        f"SlicedConfig.{where} = {width!r} is not a valid width: it must be an integer in "
                        f"[1, {full}] (the original hidden size)"
                    )
        if self.attn_input_dims and self.embedding_dim != self.attn_input_dims[0]:
            raise ValueError(
                f"SlicedConfig.embedding_dim ({self.embedding_dim}) must equal attn_input_dims[0] "
                f"({self.attn_input_dims[0]})"
            )
        for i in range(n):
            pairs = [
                ("attn_shortcuts", self.attn_shortcuts[i], self.attn_input_dims[i], self._attn_target(i))
            ]
            if self.topology == "sequential":
                pairs.append(
                    ("mlp_shortcuts", self.mlp_shortcuts[i], self.mlp_input_dims[i], self.layer_output_dim(i))
                )
            for name, flag, d_in, d_out in pairs:
                if not flag and d_in != d_out:
                    raise ValueError(
                        f"SlicedConfig.{name}[{i}] is False (identity) but the widths differ ({d_in} -> {d_out}); "
                        "set it to True"
                    )

    def _attn_target(self, layer_idx: int) -> int:
        if self.topology == "sequential":
            return self.mlp_input_dims[layer_idx]
        return self.layer_output_dim(layer_idx)


for _name in FAMILY_FIELDS:
    setattr(SlicedConfig, _name, _family_field(_name))

__all__ = ["FAMILY_FIELDS", "PROVENANCE_ATTRIBUTE", "ReadOnlyFieldError", "SlicedConfig"]
