"""hf-slicegpt: SliceGPT for Hugging Face transformers and PEFT.

``import hf_slicegpt`` registers the sliced architecture with ``AutoConfig`` and ``AutoModelForCausalLM`` (and
PEFT's default LoRA targets), so sliced checkpoints load with plain ``from_pretrained``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .adapters import (
    FamilyAdapter,
    UnsupportedModelError,
    get_adapter,
    register_adapter,
    supported_model_types,
)
from .checkpoint.export import NativeExportError, save_native, to_native
from .checkpoint.gguf_export import GGUFExportError, export_gguf
from .errors import SliceGPTError
from .modeling.configuration_sliced import SlicedConfig
from .modeling.modeling_sliced import SlicedModelForCausalLM
from .slicing import SlicingConfig, SlicingError, SlicingHooks, slice_model, sliced_width, validate_sparsity
from .workflows.pipeline import SliceJob, SliceResult, run_slice

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(SlicedConfig.model_type, SlicedConfig, exist_ok=True)
    AutoModelForCausalLM.register(SlicedConfig, SlicedModelForCausalLM, exist_ok=True)
    # save_pretrained then copies the modeling files beside the weights and writes ``auto_map``, so that
    # ``trust_remote_code=True`` loads a sliced checkpoint without this package.
    SlicedConfig.register_for_auto_class()
    SlicedModelForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    # Every save_pretrained (re)writes the model card from config.json: base model, license and source survive
    # merge_and_unload, resharding and saves from Python.
    from .checkpoint.hub import write_card_after_save

    SlicedModelForCausalLM.card_writer = staticmethod(write_card_after_save)
    # PEFT's default LoRA targets for model_type "slicegpt": `LoraConfig()` without target_modules works.
    from .workflows.rft import register_peft_targets

    register_peft_targets()


_register()

__all__ = [
    "FamilyAdapter",
    "GGUFExportError",
    "NativeExportError",
    "SlicedConfig",
    "SliceGPTError",
    "SliceJob",
    "SliceResult",
    "SlicedModelForCausalLM",
    "SlicingConfig",
    "SlicingError",
    "SlicingHooks",
    "export_gguf",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "run_slice",
    "save_native",
    "slice_model",
    "sliced_width",
    "supported_model_types",
    "to_native",
    "validate_sparsity",
]
