"""Configuration of the generic SliceGPT-sliced causal language model.

This file is shipped beside sliced checkpoints as remote code, so it imports only ``transformers``.
The config is complete: together with ``family_config`` (the original model's config) it holds every
per-layer width, so ``from_pretrained`` can build the model on the meta device from ``config.json`` alone.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Family attributes mirrored onto the top-level config: generation, the KV cache and tools such as
# PEFT or lm-eval read them from ``model.config``.
_MIRRORED_ATTRIBUTES = (
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "layer_types",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)


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

    def __post_init__(self, **kwargs: Any) -> None:
        family_attn = getattr(self.family_config, "_attn_implementation", None)
        super().__post_init__(**kwargs)
        family = self.family_config
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


__all__ = ["SlicedConfig"]
