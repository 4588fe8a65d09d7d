"""The low-memory path: slice a checkpoint on disk into a checkpoint on disk, one block in memory at a time.

:func:`slice_checkpoint` never materialises the whole model:

- the model is a skeleton on the meta device; only the embeddings, the final norm and the head are loaded;
- each block is read from the safetensors shards when its turn comes, sliced, written out as its own shard of
  the sliced checkpoint, and dropped;
- the calibration activations wait in host RAM (``offload="cpu"``) or in a memory-mapped file
  (``offload="disk"``).

Peak memory is then the embeddings and head, one block, and the activations, whatever the depth. The shards are
written into a staging directory beside the output (``.NAME.partial``), which is also the resumable state
(:mod:`hf_slicegpt.runtime.resume`), and renamed into place when complete. The result is tensor-for-tensor the
checkpoint that ``slice_model`` + ``save_pretrained`` write.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters import get_adapter
from ..checkpoint.io import check_output_dir, publish_directory, recover, temp_stem
from ..errors import SliceGPTError
from ..modeling.modeling_sliced import SlicedModelForCausalLM
from ..slicing import SlicedBlock, SlicingConfig, slice_model, validate_sparsity
from . import distributed
from .offload import check_offload
from .resume import load_tensors, shard_name

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


class StreamingError(SliceGPTError):
    """The source cannot be sliced on the low-memory path (names the reason and the alternative)."""


@functools.cache
def _libc() -> Any:
    """glibc, or ``None`` where there is none (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere.

    Each block allocates and frees tensors of new sizes. glibc raises its mmap threshold after large frees,
    so later blocks come from the heap, whose freed pages it keeps: without a trim the resident set creeps up
    block by block, and peak memory grows with depth although nothing is retained.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def staging_dir(output: str | os.PathLike) -> Path:
    """Where the low-memory path (and ``--checkpoint-every``) keeps the partial state of ``output``."""
    output = Path(output).absolute()
    return output.parent / f"{temp_stem(output)}.partial"


# -- reading the source checkpoint -------------------------------------------------------------------------------
class ShardReader:
    """Tensors of a safetensors checkpoint directory by name, read on demand (single file or sharded)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}  # noqa: SIM118
        else:
            raise StreamingError(
                f"{self.directory} has no model.safetensors or {INDEX_NAME}; the low-memory path streams "
                "safetensors checkpoints only (re-save the model with save_pretrained, or slice without it)"
            )

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.files if name.startswith(prefix)]

    def load(self, names: Iterable[str], device: torch.device | str, dtype: torch.dtype | None) -> dict:
        """The named tensors, floating ones cast to ``dtype``, grouped by file so each file opens once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in group:
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    out[name] = tensor.to(device)
        return out


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local directory with ``config.json`` and safetensors for ``source`` (directory, GGUF/alias, hub id)."""
    from ..workflows.loading import (
        _gguf_cache_dir,
        load_model_and_tokenizer,
        record_cache_provenance,
        resolve_source,
    )

    resolved = resolve_source(source)
    path = Path(resolved)
    if resolved.endswith(".gguf"):
        cache = _gguf_cache_dir(path)
        if not (cache / "config.json").is_file():
            logger.info("Dequantising %s once into %s (this loads it whole, once)", path.name, cache)
            load_model_and_tokenizer(resolved)
        record_cache_provenance(cache, path)  # what the weights were dequantised from, for the sliced config
        return cache
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StreamingError(f"{path} has no config.json")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                resolved, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
            )
        )
    except Exception as err:  # noqa: BLE001 - any hub failure is reported the same way
        raise StreamingError(
            f"cannot find a local safetensors checkpoint for {str(source)!r}: {err}"
        ) from err


def _materialize(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give a meta module the loaded tensors (``assign``: no second copy), checking that nothing is missing."""
    missing, unexpected = module.load_state_dict(dict(tensors), strict=False, assign=True)
    if unexpected:
        raise StreamingError(f"unexpected tensors {unexpected[:5]} for {type(module).__name__}")
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if still_meta:
        raise StreamingError(
            f"the checkpoint lacks {still_meta[:5]} (or they are computed buffers); the low-memory path needs a "
            "checkpoint whose tensor names are the model's own. Slice without --low-memory."
        )


def build_skeleton(directory: Path, dtype: torch.dtype | None) -> tuple[Any, ShardReader]:
    """The model on the meta device, with everything outside the decoder blocks loaded from ``directory``."""
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    adapter = get_adapter(config)
    reader = ShardReader(directory)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    layers_prefix = f"{adapter.layers}."
    outside = [n for n in reader.names() if not n.startswith(layers_prefix)]
    tensors = reader.load(outside, "cpu", dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    embed = model.get_submodule(adapter.embed_tokens)
    lm_head = model.get_submodule(adapter.lm_head)
    if lm_head.weight.is_meta and getattr(config, "tie_word_embeddings", False):
        lm_head.weight = embed.weight
    # Computed buffers (rotary frequencies) are not in checkpoints: rebuild those modules for real.
    for name, module in list(model.named_modules()):
        if name.startswith(layers_prefix) or name == adapter.layers:
            continue
        buffers = [b for b in module.buffers(recurse=False) if b.is_meta]
        if buffers:
            rebuilt = type(module)(config=config)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, rebuilt)
    leftover = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.is_meta and not n.startswith(layers_prefix)
    ]
    if leftover:
        raise StreamingError(f"{directory} lacks {leftover[:5]}; slice this model without --low-memory")
    for layer in model.get_submodule(adapter.layers):
        if any(module._non_persistent_buffers_set for module in layer.modules()):
            raise StreamingError(
                f"{type(layer).__name__} computes buffers at construction, which a streamed block would lack; "
                "slice this model without --low-memory"
            )
    return model, reader


# -- the streamed layer source ----------------------------------------------------------------------------------
class StreamedLayers:
    """A :class:`~hf_slicegpt.slicing.LayerSource` whose blocks come from disk and go to disk, one at a time.

    Each dense block is materialised from the shards when the loop fetches it and dropped back to the meta
    device after use; each finished block is written into the partial state (the shards of the output) and
    kept as shapes only.
    """

    restore_meta = True

    def __init__(self, layers: nn.ModuleList, prefix: str, reader: ShardReader, dtype: torch.dtype):
        self.layers = layers
        self.prefix = prefix
        self.reader = reader
        self.dtype = dtype
        self.partial: Any = None  # the run's partial state, whose carried state is cleared once published

    def fetch(self, idx: int, device: torch.device) -> nn.Module:
        prefix = f"{self.prefix}.{idx}."
        tensors = self.reader.load(self.reader.names(prefix), device, self.dtype)
        _materialize(self.layers[idx], {k[len(prefix) :]: v for k, v in tensors.items()})
        return self.layers[idx]

    def release(self, idx: int) -> None:
        self.layers[idx].to("meta")

    def finish(self, run: Any, idx: int, block: SlicedBlock, restored: bool) -> None:
        self.partial = run.partial
        if not restored:
            run.partial.write_layer(idx, block.tensors(idx))
        for module in (block.attn, block.mlp, block.attn_shortcut, block.mlp_shortcut):
            if module is not None:
                module.to("meta")  # written out: keep only the shapes
        self.layers[idx] = nn.Identity()
        _return_freed_memory()

    def may_stay_meta(self, name: str) -> bool:
        return name.startswith("model.layers.")


def _publish(sliced: SlicedModelForCausalLM, staging: Path, num_layers: int) -> None:
    """Write the last shard (everything outside the blocks), config, code and index into ``staging``."""
    outside = {
        name: tensor for name, tensor in sliced.state_dict().items() if not name.startswith("model.layers.")
    }
    # save_pretrained writes config.json, generation_config.json, the remote code and auto_map exactly as the
    # default path does, and drops the tied head; its weights file becomes our last shard.
    with tempfile.TemporaryDirectory(dir=staging) as scratch:
        sliced.save_pretrained(scratch, state_dict=outside)
        produced = sorted(Path(scratch).glob("*.safetensors"))
        if [p.name for p in produced] != ["model.safetensors"]:
            raise RuntimeError(f"internal error: expected one weights file, got {[p.name for p in produced]}")
        last = staging / shard_name(num_layers, num_layers + 1)
        os.replace(produced[0], last)
        for path in Path(scratch).iterdir():
            os.replace(path, staging / path.name)
    weight_map: dict[str, str] = {}
    total = 0
    for idx in range(num_layers + 1):
        file = staging / shard_name(idx, num_layers + 1)
        for name, tensor in load_tensors(file, meta=True).items():
            weight_map[name] = file.name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def slice_checkpoint(
    source: str | os.PathLike,
    calibration: Any,
    config: SlicingConfig | float,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    offload: str = "cpu",
    offload_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    extra_files: Callable[[Path, SlicedModelForCausalLM], None] | None = None,
    show_progress: bool = True,
    **slice_kwargs: Any,
) -> SlicedModelForCausalLM:
    """Slice the safetensors checkpoint ``source`` into ``output`` without holding the whole model in memory.

    Args:
        source: a checkpoint directory, a ``.gguf`` file or ``"smollm2"`` (dequantised once into the cache), or
            a hub id (downloaded once).
        calibration, config, batch_size, device, **slice_kwargs: as for :func:`hf_slicegpt.slice_model`
            (``config`` is a :class:`~hf_slicegpt.SlicingConfig` or just the sparsity).
        output: the sliced checkpoint's directory; it appears in one rename when complete.
        dtype: the dtype to compute and save in (default: the checkpoint's).
        offload: ``"cpu"`` (activations in host RAM) or ``"disk"`` (a memory-mapped file in ``offload_dir``).
        checkpoint_every, resume: save the carried state every this many layers; continue an interrupted run.
            Finished blocks are on disk anyway, so a resumed run redoes at most ``checkpoint_every`` layers.
        extra_files: called with the staging directory and the returned model before publishing
            (to add the tokenizer, a report...).

    Returns:
        the sliced model with its blocks on the meta device (their weights are in ``output``) and the rest
        loaded: enough for its config, parameter count and ``slicing_stats``. Load ``output`` to use it.
    """
    from ..workflows.loading import parse_dtype

    if not isinstance(config, SlicingConfig):
        config = validate_sparsity(config)  # fail before anything is read
    offload = check_offload(offload) or "cpu"
    output = Path(output).absolute()
    if output.parent.is_dir():
        recover(output)
    check_output_dir(output, overwrite, inputs=[source])
    directory = resolve_checkpoint(source)
    compute = distributed.local_device(device)
    model, reader = build_skeleton(directory, parse_dtype(dtype))
    staging = staging_dir(output)
    if not resume and distributed.is_main_process() and staging.exists():
        shutil.rmtree(staging)
    distributed.barrier()
    staging.mkdir(parents=True, exist_ok=True)
    logger.info("Slicing layer by layer from %s into %s (activations: %s)", directory, output, offload)
    adapter = get_adapter(model.config)
    source = StreamedLayers(
        model.get_submodule(adapter.layers), adapter.layers, reader, model.get_input_embeddings().weight.dtype
    )
    sliced = slice_model(
        model,
        calibration,
        config,
        batch_size=batch_size,
        device=compute,
        show_progress=show_progress,
        offload=offload,
        offload_dir=offload_dir,
        checkpoint_dir=staging,
        checkpoint_every=checkpoint_every,
        resume=resume,
        source=source,
        **slice_kwargs,
    )
    num_layers = model.config.num_hidden_layers
    if distributed.is_main_process():
        _publish(sliced, staging, num_layers)
        source.partial.clear_state()
        if extra_files is not None:
            extra_files(staging, sliced)
        publish_directory(staging, output)
        logger.info("Wrote %s", output)
    distributed.barrier()
    return sliced


__all__ = [
    "ShardReader",
    "StreamedLayers",
    "StreamingError",
    "build_skeleton",
    "resolve_checkpoint",
    "slice_checkpoint",
    "staging_dir",
]
