"""Checkpoint validation: refuse damaged, inconsistent or unsafe checkpoints with one clear error.

A sliced checkpoint is shared and loaded by strangers, and transformers re-initialises a tensor whose shape
disagrees with the config (or that is missing) randomly, with only a warning. Everything here reads metadata
only (``config.json`` and the safetensors headers, through ``safetensors.safe_open``), so a 70B checkpoint is
checked in well under a second, before any weight is loaded.

Every error is a ``ValueError`` subclass naming the file or tensor and the fix; the CLI prints it as one line.
Nothing here imports or runs code found in the checkpoint.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SliceGPTError
from ..modeling import configuration_sliced, modeling_sliced
from ..modeling.configuration_sliced import SlicedConfig
from ..modeling.modeling_sliced import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    SlicedCheckpointError,
    checkpoint_mismatch_error,
    expected_weight_shapes,
    weight_shape_problems,
)

logger = logging.getLogger(__name__)

# What ``save_pretrained`` writes for a sliced model after ``import hf_slicegpt``: the remote-code entry points.
OWN_AUTO_MAP = {
    "AutoConfig": "configuration_sliced.SlicedConfig",
    "AutoModelForCausalLM": "modeling_sliced.SlicedModelForCausalLM",
}
# The remote-code files shipped beside a sliced checkpoint, and the package's own copies of them.
MODELING_FILES = {
    "configuration_sliced.py": Path(configuration_sliced.__file__),
    "modeling_sliced.py": Path(modeling_sliced.__file__),
}
# Weight formats that are pickles: loading them can run arbitrary code, so they are never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class CheckpointValidationError(SliceGPTError):
    """A checkpoint directory that cannot be loaded safely and correctly."""


class InvalidConfigError(CheckpointValidationError):
    """``config.json`` is missing, not JSON, or does not describe a valid (sliced) model."""


class WeightsFileError(CheckpointValidationError):
    """The safetensors weights are missing, truncated or damaged."""


class UnsafeWeightsError(WeightsFileError):
    """Only pickle weights (``.bin``/``.pt``): loading them could run code, so they are refused."""


class MissingTokenizerError(CheckpointValidationError):
    """The model has no tokenizer, and the task needs one."""


class NonFiniteWeightsError(SliceGPTError):
    """A tensor of a model about to be saved holds NaN or Inf."""


class WeightDtypeError(WeightsFileError):
    """A weight stored as integers or booleans, which loading into a float model would cast silently."""


# safetensors dtype codes that are not floating point.
_INTEGER_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")


@dataclass
class CheckpointCheck:
    """What :func:`validate_checkpoint` found in a directory that passed."""

    path: Path
    sliced: bool
    tensors: int
    has_tokenizer: bool
    warnings: list[str] = field(default_factory=list)


def _where(directory: Path) -> str:
    return repr(str(directory))


def _interrupted_write(directory: Path) -> Path | None:
    """A checkpoint moved aside by a write that was killed before it renamed the new one into place."""
    parent = directory.absolute().parent
    if not parent.is_dir():
        return None
    olds = sorted(parent.glob(f".{directory.name}.*.old"))
    return olds[-1] if olds else None


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict, or a clear error."""
    directory = Path(directory)
    if not directory.exists():
        old = _interrupted_write(directory)
        if old is not None:
            raise CheckpointValidationError(
                f"checkpoint directory {_where(directory)} does not exist, but an interrupted write left the "
                f"previous checkpoint at {str(old)!r}; restore it with "
                f"`python -c \"from hf_slicegpt.checkpoint.io import recover; recover('{directory}')\"` or rerun the write"
            )
        raise CheckpointValidationError(f"checkpoint directory {_where(directory)} does not exist")
    if not directory.is_dir():
        raise CheckpointValidationError(f"{_where(directory)} is not a directory")
    path = directory / "config.json"
    if not path.is_file():
        raise InvalidConfigError(f"{_where(directory)} is not a model checkpoint: it has no config.json")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InvalidConfigError(f"{path} is not valid JSON ({' '.join(str(err).split())})") from err
    if not isinstance(value, dict):
        raise InvalidConfigError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def sliced_config_from_dict(values: dict[str, Any], where: str = "config.json") -> SlicedConfig:
    """Build and validate a :class:`SlicedConfig` from ``config.json`` values; any defect is one clear error.

    A config is data from anywhere, so any exception while reading it (a string where a list belongs, a
    missing family config, ...) becomes :class:`InvalidConfigError` naming the file.
    """
    if not isinstance(values.get("family_config"), dict):
        raise InvalidConfigError(
            f"{where}: a sliced config needs family_config (the original model's config) as a JSON object, got "
            f"{type(values.get('family_config')).__name__}"
        )
    try:
        return SlicedConfig.from_dict(dict(values))
    except Exception as err:  # noqa: BLE001 - data from anywhere; transformers' strict fields raise their own types
        message = " ".join(str(err).split()) or type(err).__name__
        raise InvalidConfigError(f"{where} is not a valid sliced config: {message}") from err


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or every shard its index names); [] if none."""
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsFileError(f"{index} is damaged ({err}); re-save or re-download the checkpoint") from err
    files = []
    for shard in shards:
        if Path(shard).name != shard:
            raise WeightsFileError(
                f"{index} names the shard {shard!r}, which is not a file name in the directory"
            )
        if not (directory / shard).is_file():
            raise WeightsFileError(
                f"{index} names the shard {shard!r}, which is missing from {_where(directory)}; re-save or "
                "re-download the checkpoint"
            )
        files.append(directory / shard)
    return files


def read_weight_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (no weights are read); refuses pickles and damage."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    files = weight_files(directory)
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeWeightsError(
                f"{_where(directory)} holds weights only as pickle files ({', '.join(pickles)}), which can run code "
                "when loaded; hf-slicegpt loads safetensors only. Convert them with a tool you trust, e.g. "
                "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)` in a sandbox"
            )
        raise WeightsFileError(
            f"{_where(directory)} has no weights: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (an interrupted "
            "save? re-save or re-download the checkpoint)"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.stat().st_size < 8:
            raise WeightsFileError(
                f"{path} is truncated ({path.stat().st_size} bytes); re-save or re-download it"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsFileError(
                f"{path} is truncated or damaged ({' '.join(str(err).split())}); an interrupted write or download? "
                "Re-save or re-download the checkpoint"
            ) from err
    return shapes


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory carries tokenizer files."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def missing_tokenizer_error(source: str | os.PathLike, purpose: str) -> MissingTokenizerError:
    """The error for a model without a tokenizer, with the fix (``purpose``: what needed it)."""
    return MissingTokenizerError(
        f"model {str(source)!r} has no tokenizer, which {purpose} needs; copy the original model's tokenizer "
        f"into it (`AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({str(source)!r})`)"
    )


def integer_weights(directory: str | os.PathLike) -> dict[str, str]:
    """Tensors stored as integers or booleans (name -> safetensors dtype), from the headers only."""
    from safetensors import safe_open

    found: dict[str, str] = {}
    for path in weight_files(Path(directory)):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                dtype = handle.get_slice(name).get_dtype()
                if dtype in _INTEGER_DTYPES:
                    found[name] = dtype
    return found


def check_weight_dtypes(model: torch.nn.Module, directory: str | os.PathLike | None) -> None:
    """Refuse a checkpoint that stores one of ``model``'s float tensors as integers or booleans.

    transformers casts such a tensor into the float parameter without a word, which destroys it (an int32
    ``q_proj`` becomes garbage). Integer buffers a model really has (a position-id table) are fine.
    """
    if directory is None:
        return
    floats = {
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point()
    }
    for name, dtype in sorted(integer_weights(directory).items()):
        if name in floats:
            raise WeightDtypeError(
                f"{Path(directory) / 'model.safetensors'!s}: tensor {name} is stored as {dtype}, but the model "
                "needs floating-point weights there; loading would cast it silently and destroy it. Re-save the "
                "checkpoint with its real float weights"
            )


def _foreign_auto_map(config: dict[str, Any], own: dict[str, str] | None) -> dict[str, Any]:
    """The ``auto_map`` entries of a config dict that are not hf-slicegpt's own (``own``: ours, if any)."""
    auto_map = config.get("auto_map")
    if auto_map is None:
        return {}
    entries = auto_map.items() if isinstance(auto_map, dict) else [("auto_map", auto_map)]
    return {str(key): value for key, value in entries if own is None or own.get(str(key)) != value}


def tokenizer_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``tokenizer_config.json`` as a dict ({} if missing or unreadable)."""
    path = Path(directory) / "tokenizer_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def remote_code_warnings(directory: str | os.PathLike, config: dict[str, Any] | None = None) -> list[str]:
    """Why the remote code a checkpoint would run under ``trust_remote_code=True`` is not ours, if it is not.

    hf-slicegpt itself never runs it (sliced models load with the package's own classes, and its loaders keep
    ``trust_remote_code`` off, tokenizers included); the warning names every ``auto_map`` entry that is not
    ours, in ``config.json`` or ``tokenizer_config.json`` (a tokenizer never has code of ours).
    """
    directory = Path(directory)
    config = read_config_dict(directory) if config is None else config
    auto_map = config.get("auto_map")
    warnings = []
    tokenizer_code = _foreign_auto_map(tokenizer_config_dict(directory), None)
    if tokenizer_code:
        listed = ", ".join(f"{key} -> {value!r}" for key, value in sorted(tokenizer_code.items()))
        warnings.append(
            f"tokenizer_config.json in {_where(directory)} maps auto classes to code that is not hf-slicegpt's "
            f"({listed}); hf-slicegpt does not run it, but loading this tokenizer with trust_remote_code=True would"
        )
    if auto_map is not None:
        entries = auto_map.items() if isinstance(auto_map, dict) else [("auto_map", auto_map)]
        foreign = {
            str(key): value
            for key, value in entries
            if OWN_AUTO_MAP.get(str(key)) != value or config.get("model_type") != SlicedConfig.model_type
        }
        if foreign:
            listed = ", ".join(f"{key} -> {value!r}" for key, value in sorted(foreign.items()))
            warnings.append(
                f"config.json in {_where(directory)} maps auto classes to code that is not hf-slicegpt's ({listed}); "
                "hf-slicegpt does not run it, but loading this checkpoint with trust_remote_code=True would"
            )
    if config.get("model_type") == SlicedConfig.model_type:
        for name, own in MODELING_FILES.items():
            path = directory / name
            if path.is_file() and not filecmp.cmp(path, own, shallow=False):
                warnings.append(
                    f"{name} in {_where(directory)} differs from hf-slicegpt's own copy (written by another "
                    "version, or modified); trust_remote_code=True would run that file, hf-slicegpt does not"
                )
    return warnings


def validate_checkpoint(
    directory: str | os.PathLike, *, require_tokenizer: bool = False, purpose: str = "this command"
) -> CheckpointCheck:
    """Check a checkpoint directory from its metadata alone; raise one clear ``ValueError`` on any defect.

    - ``config.json`` exists and is JSON; a sliced one builds a valid :class:`SlicedConfig` (every width in
      ``[1, hidden_size]``, one per layer, shortcuts consistent);
    - the weights are safetensors (pickles are refused), present, complete (not truncated) and, for a sliced
      checkpoint, exactly the tensors and shapes the config implies;
    - with ``require_tokenizer``, tokenizer files are present.

    Remote-code warnings (see :func:`remote_code_warnings`) are logged and returned, never raised.
    """
    directory = Path(directory)
    values = read_config_dict(directory)
    model_type = values.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise InvalidConfigError(
            f"{directory / 'config.json'}: model_type must be a string such as {SlicedConfig.model_type!r}, "
            f"got {model_type!r}"
        )
    sliced = model_type == SlicedConfig.model_type
    config = sliced_config_from_dict(values, where=str(directory / "config.json")) if sliced else None
    shapes = read_weight_shapes(directory)
    if config is not None:
        try:
            expected, tied = expected_weight_shapes(config)
        except Exception as err:  # noqa: BLE001 - any failure to build the model from this config
            message = " ".join(str(err).split()) or type(err).__name__
            raise InvalidConfigError(
                f"{directory / 'config.json'} does not describe a buildable sliced model: {message}"
            ) from err
        problems = weight_shape_problems(expected, tied, shapes)
        if problems:
            raise checkpoint_mismatch_error(_where(directory), problems)
        integers = integer_weights(directory)
        for name in sorted(set(integers) & set(expected)):
            raise WeightDtypeError(
                f"{_where(directory)}: tensor {name} is stored as {integers[name]}, but a sliced model's weights are "
                "floating point; loading would cast it silently and destroy it. Re-save the checkpoint"
            )
    tokenizer = has_tokenizer(directory)
    if require_tokenizer and not tokenizer:
        raise missing_tokenizer_error(directory, purpose)
    warnings = remote_code_warnings(directory, values)
    for warning in warnings:
        logger.warning(warning)
    return CheckpointCheck(directory, sliced, len(shapes), tokenizer, warnings)


def check_finite_weights(model: torch.nn.Module, what: str = "the sliced model") -> None:
    """Refuse a model with a NaN or Inf tensor (e.g. an fp16 overflow), naming the first one and the fix."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            if tensor.dtype in (torch.float16,):
                fix = (
                    "slice in float32 or bfloat16 (--dtype float32 / dtype=torch.float32), whose range does not "
                    "overflow"
                )
            else:  # float32/bfloat16 do not overflow here: the input model (or its calibration) is at fault
                fix = (
                    f"{tensor.dtype} does not overflow, so check the input model's weights feeding {name} "
                    "(NaN/Inf in the checkpoint?) and the calibration data"
                )
            raise NonFiniteWeightsError(
                f"{what} holds NaN or Inf in {name} ({tensor.dtype}), so it is not saved; {fix}"
            )


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def achieved_sparsity(config: Any) -> float | None:
    """The fraction of the hidden size actually removed, from a sliced config's widths (object or dict).

    The mean over every block's input widths (attention and MLP), so a clamped width (``round_to`` never goes
    below one multiple) or a variance schedule is reported as it is, not as it was asked for.
    """
    hidden = _field(config, "norm_divisor")
    widths = [*(_field(config, "attn_input_dims") or []), *(_field(config, "mlp_input_dims") or [])]
    if not isinstance(hidden, int) or hidden < 1 or not widths:
        return None
    return 1.0 - sum(widths) / (len(widths) * hidden)


def record_achieved_sparsity(config: Any) -> float | None:
    """Store the achieved sparsity in ``config.slicing`` beside the requested one; warn when they differ by more
    than rounding down to a multiple of ``round_to`` explains: rounding down removes a little more than asked,
    by less than one step; a width clamped at one multiple removes less (0.999 asked, 0.75 removed of 32)."""
    achieved = achieved_sparsity(config)
    slicing = getattr(config, "slicing", None)
    if achieved is None or not isinstance(slicing, dict):
        return achieved
    slicing["achieved_sparsity"] = round(achieved, 6)
    requested, round_to = slicing.get("sparsity"), slicing.get("round_to") or 1
    step = round_to / config.norm_divisor
    if (
        slicing.get("schedule", "const") == "const"
        and requested is not None
        and not -1e-9 <= achieved - requested < step + 1e-9
    ):
        logger.warning(
            "Asked for sparsity %g but %g of the hidden size was removed: widths are multiples of round_to=%d "
            "and never below one (hidden size %d); lower --round-to to get closer",
            requested,
            achieved,
            round_to,
            config.norm_divisor,
        )
    return achieved


__all__ = [
    "MODELING_FILES",
    "OWN_AUTO_MAP",
    "CheckpointCheck",
    "CheckpointValidationError",
    "InvalidConfigError",
    "MissingTokenizerError",
    "NonFiniteWeightsError",
    "SlicedCheckpointError",
    "UnsafeWeightsError",
    "WeightsFileError",
    "WeightDtypeError",
    "achieved_sparsity",
    "record_achieved_sparsity",
    "check_finite_weights",
    "check_weight_dtypes",
    "integer_weights",
    "tokenizer_config_dict",
    "has_tokenizer",
    "missing_tokenizer_error",
    "read_config_dict",
    "read_weight_shapes",
    "remote_code_warnings",
    "sliced_config_from_dict",
    "validate_checkpoint",
]
