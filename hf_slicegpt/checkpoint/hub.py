"""Model cards for sliced checkpoints and adapters, and publishing them to the Hugging Face Hub.

A card is built from what the output directory already holds: ``config.json`` (slicing settings and per-layer
widths), ``slicing_report.json`` (calibration, dense/sliced perplexity and parameters), ``rft_report.json``
(recovery fine-tuning) and ``zeroshot_results.json`` (lm-eval), so ``hf-slicegpt slice`` and ``rft`` write one
with :func:`write_model_card` and ``hf-slicegpt push`` can refresh it with the repo id.

The templates live in ``hf_slicegpt/model_cards/`` (package data; the top-level ``model_cards/`` of the source
tree is a link to it) and are rendered by ``huggingface_hub.ModelCard.from_template``; the metadata is a
``huggingface_hub.ModelCardData`` whose ``eval_results`` become the card's ``model-index``.

Nothing here touches the network except :func:`push` (through ``huggingface_hub.HfApi``) and, never
implicitly, a Hub model card read from the local Hugging Face cache.
"""

from __future__ import annotations

import filecmp
import glob
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from ..errors import SliceGPTError
from ..modeling.configuration_sliced import SlicedConfig
from .names import REPORT_NAME, RFT_REPORT_NAME
from .report import read_json_file, safetensors_parameters

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
GENERATED_MARKER = "hf-slicegpt:generated"
ZEROSHOT_NAME = "zeroshot_results.json"
TEMPLATES = {"sliced": "sliced_model.md", "adapter": "adapter.md"}
REPO_PLACEHOLDER = "path/to/this/model"
# Local aliases whose Hub origin and license are known.
KNOWN_BASE_MODELS: dict[str, tuple[str, str | None]] = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
_MODELING_FILES = ("configuration_sliced.py", "modeling_sliced.py")
_PPL_NAMES = {
    "dense": "Perplexity (dense base model)",
    "before": "Perplexity (sliced, before RFT)",
    "this": "Perplexity",
}

CheckpointKind = Literal["sliced", "adapter"]


class InvalidCheckpointError(SliceGPTError):
    """A directory is not a complete sliced checkpoint or PEFT adapter."""


class PushError(SliceGPTError):
    """A push cannot go ahead with these arguments."""


# --------------------------------------------------------------------------------------------
# Reading a checkpoint directory
# --------------------------------------------------------------------------------------------


def _missing(directory: Path, name: str, why: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"{str(directory)!r} is not a valid {why}: missing {name}")


def checkpoint_kind(directory: str | os.PathLike) -> CheckpointKind:
    """``"sliced"`` or ``"adapter"``; raises :class:`InvalidCheckpointError` naming the first missing file.

    A sliced checkpoint needs ``config.json`` (``model_type`` ``slicegpt``), its safetensors weights (every
    shard an index names) and the modeling files that ``trust_remote_code=True`` loads. An adapter needs
    ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    path = Path(directory)
    if not path.is_dir():
        raise InvalidCheckpointError(f"{str(path)!r} is not a directory")
    if (path / "adapter_config.json").is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise _missing(path, "adapter_model.safetensors", "PEFT adapter")
        return "adapter"
    if not (path / "config.json").is_file():
        raise _missing(path, "config.json", "sliced checkpoint (or adapter_config.json for an adapter)")
    config = read_json_file(path / "config.json") or {}
    if config.get("model_type") != SlicedConfig.model_type:
        raise InvalidCheckpointError(
            f"{str(path)!r} holds a {config.get('model_type')!r} model, not a sliced one (model_type 'slicegpt'); "
            "slice it first with `hf-slicegpt slice`"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(((read_json_file(index) or {}).get("weight_map") or {}).values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise _missing(path, shard, "sliced checkpoint")
    elif not (path / "model.safetensors").is_file():
        raise _missing(path, "model.safetensors", "sliced checkpoint")
    for name in _MODELING_FILES:
        if not (path / name).is_file():
            raise InvalidCheckpointError(
                f"{str(path)!r} is not a valid sliced checkpoint: missing {name} (needed by "
                "trust_remote_code=True); re-save it with save_pretrained after `import hf_slicegpt`"
            )
    return "sliced"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def incomplete_parts(directory: str | os.PathLike, kind: CheckpointKind) -> dict[str, str]:
    """What a loadable checkpoint still lacks to be useful on the Hub, by part, each with why it matters.

    ``save_pretrained`` writes weights, config and modeling code; the tokenizer comes from the tokenizer's own
    save, the report from ``hf-slicegpt slice`` (or ``rft``). Empty when nothing is missing.
    """
    path = Path(directory)
    missing = {}
    # An adapter's users load the tokenizer with its base model.
    if kind == "sliced" and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing["tokenizer"] = "tokenizer (tokenizer.json / tokenizer_config.json)"
    if kind == "sliced" and not (path / REPORT_NAME).is_file():
        missing["report"] = (
            f"{REPORT_NAME}: the card will have no calibration settings or perplexities "
            "(`hf-slicegpt slice` writes it)"
        )
    if kind == "adapter" and not (path / RFT_REPORT_NAME).is_file():
        missing["report"] = (
            f"{RFT_REPORT_NAME}: the card will have no training settings (`hf-slicegpt rft` writes it)"
        )
    return missing


def upload_files(directory: str | os.PathLike) -> list[str]:
    """The files :func:`push` uploads: every regular file, minus hidden ones and ``__pycache__``."""
    root = Path(directory)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if not name.startswith(".") and full.is_file() and not full.is_symlink():
                files.append(full.relative_to(root).as_posix())
    return files


def unsafe_files(directory: str | os.PathLike, files: Sequence[str]) -> list[str]:
    """The files of an upload that can run code on whoever loads them: pickles (``.bin``, ``.pt``, ...) and
    any ``.py`` that is not hf-slicegpt's own remote code, byte for byte."""
    from .validation import MODELING_FILES, PICKLE_SUFFIXES

    root = Path(directory)
    unsafe = []
    for name in files:
        suffix = Path(name).suffix.lower()
        if suffix in (*PICKLE_SUFFIXES, ".joblib"):
            unsafe.append(name)
        elif suffix == ".py":
            own = MODELING_FILES.get(name)
            if own is None or not filecmp.cmp(root / name, own, shallow=False):
                unsafe.append(name)
    return unsafe


def _dense_parameters(family_config: Any) -> int | None:
    """Parameters of the dense model a sliced config came from, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            dense = AutoModelForCausalLM.from_config(family_config)
    except (ValueError, KeyError, TypeError, ImportError) as exc:
        logger.debug("Cannot rebuild the dense model to count parameters: %s", exc)
        return None
    return sum(p.numel() for p in dense.parameters())


def _existing_metadata(directory: Path) -> dict[str, Any]:
    """Metadata worth carrying over from an existing card (ours, or one PEFT wrote).

    A ``base_model`` that is not a Hub id (PEFT writes the local path) and the Hub's derived
    ``base_model:...`` tags are dropped; evaluation results are rebuilt, never carried over.
    """
    card = directory / CARD_NAME
    if not card.is_file():
        return {}
    try:
        data = ModelCard.load(card, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring the metadata of %s: %s", card, exc)
        return {}
    base = data.get("base_model")
    if isinstance(base, list) or not _is_repo_id(base):
        data.pop("base_model", None)
    data["tags"] = [
        t for t in data.get("tags") or [] if isinstance(t, str) and not t.startswith("base_model:")
    ]
    data.pop("model-index", None)
    return data


def is_generated_card(directory: str | os.PathLike) -> bool:
    """Whether ``README.md`` is missing or still the card hf-slicegpt generated (so it may be refreshed)."""
    card = Path(directory) / CARD_NAME
    return not card.is_file() or GENERATED_MARKER in card.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Names, licenses, datasets
# --------------------------------------------------------------------------------------------


def _is_repo_id(name: Any) -> bool:
    if not isinstance(name, str) or not name or Path(name).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.endswith((".gguf", ".safetensors", ".bin"))


def _hub_id_or_none(name: Any) -> str | None:
    return name if _is_repo_id(name) else None


def hub_base_model(source: Any) -> str | None:
    """The Hub id of a model source (a hub id, or a known alias such as ``smollm2``); ``None`` for paths."""
    if source in KNOWN_BASE_MODELS:
        return KNOWN_BASE_MODELS[source][0]
    return source if _is_repo_id(source) else None


def base_model_license(source: Any) -> str | None:
    """The license of a base model where it is known without the network.

    From a known alias, a local model directory's ``README.md``, or a Hub card already in the local cache.
    """
    if source in KNOWN_BASE_MODELS:
        return KNOWN_BASE_MODELS[source][1]
    if not isinstance(source, str) or not source:
        return None
    card_path: Path | None = None
    if Path(source).is_dir():
        card_path = Path(source) / CARD_NAME
    elif _is_repo_id(source):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, CARD_NAME)
        card_path = Path(cached) if isinstance(cached, str) else None
    if card_path is None or not card_path.is_file():
        return None
    try:
        return ModelCard.load(card_path, ignore_metadata_errors=True).data.license
    except (OSError, ValueError):
        return None


def hub_dataset(source: Any) -> str | None:
    """The Hub dataset id behind a data source name (presets and hub ids); ``None`` for local text."""
    if not isinstance(source, str) or not source or source == "pydocs":
        return None
    from ..workflows.data import PRESETS

    if source in PRESETS:
        return PRESETS[source].path
    return (
        source
        if _is_repo_id(source) and not source.endswith((".txt", ".json", ".jsonl", ".parquet"))
        else None
    )


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    return "n/a" if value is None else str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.4g}%"


@dataclass
class _Facts:
    """Everything a card says, gathered from a directory (and its base, for an adapter)."""

    kind: CheckpointKind
    directory: Path
    config: dict[str, Any] = field(default_factory=dict)
    slicing_report: dict[str, Any] = field(default_factory=dict)
    rft_report: dict[str, Any] = field(default_factory=dict)
    zero_shot: dict[str, Any] | None = None
    adapter_config: dict[str, Any] = field(default_factory=dict)


def _gather(directory: Path, kind: CheckpointKind, zero_shot: Mapping[str, Any] | None) -> _Facts:
    facts = _Facts(kind=kind, directory=directory)
    facts.rft_report = read_json_file(directory / RFT_REPORT_NAME) or {}
    facts.zero_shot = dict(zero_shot) if zero_shot is not None else read_json_file(directory / ZEROSHOT_NAME)
    config_dir = directory
    if kind == "adapter":
        facts.adapter_config = read_json_file(directory / "adapter_config.json") or {}
        base = facts.adapter_config.get("base_model_name_or_path")
        config_dir = Path(base) if isinstance(base, str) and Path(base).is_dir() else None
    if config_dir is not None:
        facts.config = read_json_file(config_dir / "config.json") or {}
        facts.slicing_report = read_json_file(config_dir / REPORT_NAME) or {}
    return facts


def _achieved(config: Mapping[str, Any], slicing: Mapping[str, Any]) -> float | None:
    """The sparsity really removed (recorded, or computed from the widths for older checkpoints)."""
    from .validation import achieved_sparsity

    value = slicing.get("achieved_sparsity")
    return value if isinstance(value, (int, float)) else achieved_sparsity(dict(config))


def _layer_rows(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    attn = config.get("attn_input_dims") or []
    mlp = config.get("mlp_input_dims") or []
    rows = []
    for idx, width in enumerate(attn):
        output = attn[idx + 1] if idx + 1 < len(attn) else config.get("head_input_dim")
        rows.append(
            {
                "layer": idx,
                "attn_input_dim": width,
                "mlp_input_dim": mlp[idx] if idx < len(mlp) else None,
                "output_dim": output,
            }
        )
    return rows


_FLOAT_GGUF_TYPES = ("F32", "F16", "BF16")


def _provenance(facts: _Facts) -> dict[str, Any]:
    """Where the dense weights came from: ``config.json``'s ``provenance`` (carried by every re-save), else
    the report's ``source``."""
    found = facts.config.get("provenance") or facts.slicing_report.get("source")
    return dict(found) if isinstance(found, Mapping) else {}


def _source_text(provenance: Mapping[str, Any]) -> str | None:
    """One phrase for the card: what file and weight type the dense model was read from (GGUF only)."""
    if provenance.get("source_format") != "gguf":
        return None
    kind, name = provenance.get("quantization"), provenance.get("source_file")
    file = f"`{name}`" if name else "a file"
    if kind and kind not in _FLOAT_GGUF_TYPES:
        return f"dequantised from the {kind} GGUF {file}"
    return f"read from the {kind + ' ' if kind else ''}GGUF {file}"


def _source_line(provenance: Mapping[str, Any]) -> str | None:
    text = _source_text(provenance)
    if text is None:
        return None
    kind = provenance.get("quantization")
    line = f"The dense weights were {text}, not taken from the original checkpoint"
    if kind and kind not in _FLOAT_GGUF_TYPES:
        line += f": the dense figures below describe that {kind} copy"
    return line + "."


def _correction_text(correction: Any) -> str:
    """The correction row: none (the paper's weights) or the refit and what it removed on held-out data."""
    if not isinstance(correction, dict):
        return "none (recorded before the correction existed)"
    if correction.get("method") in (None, "none"):
        return "none (the paper's weights)"
    refit = "writers and shortcuts" if correction.get("shortcuts", True) else "writers"
    text = f"{correction['method']}: {refit} refit to the dense model's outputs"
    ratio = correction.get("held_out_error_ratio")
    if isinstance(ratio, (int, float)):
        text += f" (held-out error x{ratio:.2f}, {correction.get('updates_changed')} of {correction.get('updates')} updates changed)"
    return text


def _settings_rows(facts: _Facts) -> list[tuple[str, str]]:
    config, report = facts.config, facts.slicing_report
    slicing = config.get("slicing") or report.get("slicing") or {}
    settings = report.get("settings") or {}
    family = (config.get("family_config") or {}).get("model_type") or slicing.get("family")
    source = _source_text(_provenance(facts))
    rows = [
        ("sparsity", _pct(slicing.get("sparsity"))),
        ("sparsity achieved (from the widths)", _pct(_achieved(config, slicing))),
        *([("dense weights", source)] if source else []),
        ("family", _fmt(family)),
        ("block topology", _fmt(config.get("topology"))),
        ("rotation / schedule", f"{slicing.get('rotation', 'n/a')} / {slicing.get('schedule', 'n/a')}"),
        ("output correction", _correction_text(slicing.get("correction"))),
        ("widths rounded to a multiple of", _fmt(slicing.get("round_to"))),
        ("head input sliced", _fmt(slicing.get("slice_head"))),
        ("tied embeddings kept (stored once)", _fmt(bool(config.get("embed_proj")))),
    ]
    if settings.get("calibration"):
        rows.append(
            (
                "calibration data",
                f"`{settings['calibration']}`: {settings.get('num_samples', '?')} x {settings.get('seq_len', '?')} "
                f"tokens, seed {settings.get('seed', '?')}",
            )
        )
        if settings.get("broad_mix"):
            kinds = ", ".join(settings.get("broad_mix_kinds", ["code", "structured"]))  # before "prose" came
            rows.append(
                ("built-in broad mix", f"{settings['broad_mix']:g} of the windows per kind ({kinds})")
            )
        elif settings.get("broad_mix_skipped"):
            rows.append(("built-in broad mix", "skipped (too few calibration windows, or no text)"))
    elif slicing.get("calibration_sequences"):
        rows.append(("calibration sequences", _fmt(slicing.get("calibration_sequences"))))
    if slicing.get("calibration_tokens"):
        rows.append(("calibration tokens", _fmt(slicing["calibration_tokens"])))
    explained = report.get("explained_variance") or {}
    if explained.get("min") is not None:
        rows.append(
            ("calibration variance kept", f"min {_pct(explained['min'])}, mean {_pct(explained.get('mean'))}")
        )
    return rows


def _parameter_rows(facts: _Facts) -> list[tuple[str, str]]:
    params = facts.slicing_report.get("parameters") or {}
    dense = params.get("dense")
    if dense is None and facts.config.get("family_config"):
        from transformers import AutoConfig

        family = dict(facts.config["family_config"])
        model_type = family.pop("model_type", None)
        try:
            dense = _dense_parameters(AutoConfig.for_model(model_type, **family)) if model_type else None
        except (ValueError, KeyError, TypeError) as exc:
            logger.debug("Cannot rebuild the family config: %s", exc)
    sliced = safetensors_parameters(facts.directory) if facts.kind == "sliced" else params.get("sliced")
    rows = [("dense", _fmt(dense))]
    fraction = f" ({sliced / dense:.1%} of dense)" if sliced and dense else ""
    rows.append(("sliced" + (" + merged LoRA" if facts.rft_report else ""), _fmt(sliced) + fraction))
    return rows


def _perplexity(facts: _Facts) -> tuple[str | None, str, list[tuple[str, float]]]:
    """(data, detail, [(row name, value)]) of the measured perplexities, this model last."""
    sliced_ppl = facts.slicing_report.get("perplexity") or {}
    rft_ppl = facts.rft_report.get("perplexity") or {}
    rows: list[tuple[str, float]] = []
    if rft_ppl:
        data, seq_len, tokens = rft_ppl.get("data"), rft_ppl.get("seq_len"), rft_ppl.get("tokens")
        same = sliced_ppl.get("data") == data and sliced_ppl.get("seq_len") == seq_len
        if same and sliced_ppl.get("dense") is not None:
            rows.append(("dense", float(sliced_ppl["dense"])))
        rows.append(("before", float(rft_ppl["before"])))
        rows.append(("this", float(rft_ppl["after"])))
    elif sliced_ppl.get("sliced") is not None:
        data, seq_len, tokens = sliced_ppl.get("data"), sliced_ppl.get("seq_len"), sliced_ppl.get("tokens")
        if sliced_ppl.get("dense") is not None:
            rows.append(("dense", float(sliced_ppl["dense"])))
        rows.append(("this", float(sliced_ppl["sliced"])))
    else:
        return None, "", []
    detail = f"seq-len {seq_len}, {_fmt(tokens)} tokens" if seq_len else ""
    return data, detail, rows


def _zero_shot_rows(zero_shot: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not zero_shot:
        return []
    rows = []
    for task, score in (zero_shot.get("tasks") or {}).items():
        rows.append({"task": task, "metric": score.get("metric"), "value": _fmt(score.get("value"))})
        for name, other in (score.get("also") or {}).items():  # e.g. acc beside acc_norm: shown, not averaged
            rows.append({"task": task, "metric": name, "value": _fmt(other.get("value"))})
    if zero_shot.get("average") is not None and rows:
        rows.append({"task": "**average**", "metric": "", "value": _fmt(zero_shot["average"])})
    return rows


def _rft_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    if not report:
        return []
    settings = report.get("settings") or {}
    training = report.get("training") or {}
    data = report.get("data") or {}
    targets = settings.get("target_modules")
    rows = [
        (
            "LoRA rank r / alpha / dropout",
            f"{settings.get('r')} / {settings.get('lora_alpha')} / {settings.get('lora_dropout')}",
        ),
        ("target modules", _fmt(targets) if isinstance(targets, list) else f"`{targets}`"),
        ("training data", f"`{data.get('train')}`"),
        ("sequences x tokens", f"{training.get('sequences')} x {training.get('seq_len')}"),
        ("optimizer steps", _fmt(training.get("global_step"))),
        ("learning rate / schedule", f"{settings.get('learning_rate')} / {settings.get('lr_scheduler')}"),
        (
            "batch (per device x accumulation x devices)",
            f"{settings.get('batch_size')} x {settings.get('grad_accum')} x {training.get('world_size', 1)}",
        ),
        ("mixed precision", "bf16" if settings.get("bf16") else "no"),
        ("final training loss", _fmt(training.get("train_loss"))),
        ("trainable parameters", _fmt((report.get("parameters") or {}).get("trainable"))),
    ]
    return rows


def _eval_results(facts: _Facts, ppl: tuple[str | None, str, list[tuple[str, float]]]) -> list[EvalResult]:
    results = []
    data, _, rows = ppl
    if data is not None:
        dataset = hub_dataset(data) or data
        for key, value in rows:
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Language modelling (held-out perplexity)",
                    dataset_type=dataset,
                    dataset_name=data,
                    metric_type="perplexity",
                    metric_value=round(value, 4),
                    metric_name=_PPL_NAMES[key],
                )
            )
    for task, score in ((facts.zero_shot or {}).get("tasks") or {}).items():
        if score.get("value") is None:
            continue
        shots = (facts.zero_shot or {}).get("num_fewshot", 0)
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name=task,
                dataset_type=score.get("dataset_path") or task,
                dataset_name=task,
                dataset_config=score.get("dataset_name"),
                dataset_split=score.get("split"),
                dataset_args={"num_few_shot": shots},
                metric_type=score.get("metric"),
                metric_value=round(float(score["value"]), 4),
                metric_name=f"{score.get('metric')} ({shots}-shot)",
            )
        )
    return results


def build_model_card(
    directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    language: str | Sequence[str] | None = None,
    zero_shot: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
    name: str | None = None,
) -> ModelCard:
    """The model card of a sliced checkpoint or adapter directory, from what the directory holds.

    Args:
        directory: a sliced checkpoint or PEFT adapter (see :func:`checkpoint_kind`).
        repo_id: the Hub repo it will live in (used in the usage snippets and ``model-index``).
        base_model: Hub id of the dense model it was sliced from (default: from ``slicing_report.json``; the
            sliced model's id for an adapter).
        license, datasets, language: metadata; by default carried over from an existing card, the base model
            (when known offline) and the calibration / training sources.
        zero_shot: the dict of :func:`hf_slicegpt.workflows.zeroshot.evaluate_tasks` (default: ``zeroshot_results.json``).
        tags: extra tags.
        name: the model's name in the title and ``model-index`` (default: the repo's or directory's name).
    """
    directory = Path(directory)
    kind = checkpoint_kind(directory)
    facts = _gather(directory, kind, zero_shot)
    existing = _existing_metadata(directory)
    slicing_settings = facts.slicing_report.get("settings") or {}
    dense_source = facts.slicing_report.get("model")
    provenance = _provenance(facts)

    if kind == "adapter":
        base_ref = facts.adapter_config.get("base_model_name_or_path") or "path/to/sliced/model"
        base = base_model or existing.get("base_model") or hub_base_model(base_ref)
        library = "peft"
    else:
        base_ref = dense_source
        base = (
            base_model
            or existing.get("base_model")
            or hub_base_model(dense_source)
            or _hub_id_or_none(provenance.get("base_model"))
        )
        library = "transformers"
    license_ = (
        license or existing.get("license") or base_model_license(dense_source) or provenance.get("license")
    )
    if datasets is None:
        datasets = existing.get("datasets")
    if datasets is None:
        found = [
            hub_dataset(slicing_settings.get("calibration")),
            hub_dataset((facts.rft_report.get("data") or {}).get("train")),
        ]
        datasets = list(dict.fromkeys(d for d in found if d)) or None
    family = (facts.config.get("family_config") or {}).get("model_type") or (
        facts.config.get("slicing") or {}
    ).get("family")
    all_tags = ["slicegpt", "sliced"] + ([family] if family else [])
    if facts.rft_report:
        all_tags += ["lora", "recovery-fine-tuning"]
    all_tags += [t for t in existing.get("tags") or [] if t not in all_tags]
    all_tags += [t for t in tags if t not in all_tags]

    name = repo_id.split("/")[-1] if repo_id else name or directory.absolute().name
    ppl = _perplexity(facts)
    eval_results = _eval_results(facts, ppl)
    card_data = ModelCardData(
        base_model=base,
        library_name=library,
        pipeline_tag="text-generation",
        license=license_,
        datasets=list(datasets) if datasets else None,
        language=language or existing.get("language"),
        tags=all_tags,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    slicing = facts.config.get("slicing") or {}
    sparsity = slicing.get("sparsity")
    if base:
        base_line = f"[`{base}`](https://huggingface.co/{base})"
    elif dense_source:
        base_line = f"`{Path(str(dense_source)).name}`"
    else:
        base_line = "A model"
    data, detail, rows = ppl
    template = (
        resources.files("hf_slicegpt").joinpath("model_cards", TEMPLATES[kind]).read_text(encoding="utf-8")
    )
    zero_shot_rows = _zero_shot_rows(facts.zero_shot)
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        title=name,
        repo=repo_id or REPO_PLACEHOLDER,
        base_line=base_line,
        source_line=_source_line(provenance),
        base_ref=base_ref,
        sparsity=sparsity,
        sparsity_pct=_pct(_achieved(facts.config, slicing) if facts.config.get("norm_divisor") else sparsity),
        rft=bool(facts.rft_report),
        settings_rows=_settings_rows(facts) if facts.config else [],
        parameter_rows=_parameter_rows(facts) if facts.config else [],
        hidden_size=facts.config.get("norm_divisor") or facts.config.get("hidden_size"),
        sequential=facts.config.get("topology", "sequential") == "sequential",
        layer_rows=_layer_rows(facts.config),
        perplexity_data=data,
        perplexity_detail=detail,
        perplexity_rows=[
            ({"dense": "dense", "before": "sliced (before RFT)", "this": f"**{name}**"}[k], _fmt(v))
            for k, v in rows
        ],
        zero_shot_rows=zero_shot_rows,
        zero_shot_version=(facts.zero_shot or {}).get("lm_eval_version", ""),
        zero_shot_shots=(facts.zero_shot or {}).get("num_fewshot", 0),
        rft_rows=_rft_rows(facts.rft_report),
    )
    # Optional template sections leave runs of blank lines behind; markdown needs at most one.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))


def write_model_card(directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Build the card of ``directory`` (see :func:`build_model_card`) and write it as ``README.md``."""
    card = build_model_card(directory, **kwargs)
    path = Path(directory) / CARD_NAME
    card.save(path)
    logger.info("Wrote model card %s", path)
    return path


def write_card_after_save(directory: str | os.PathLike) -> Path | None:
    """What ``SlicedModelForCausalLM.save_pretrained`` calls (with the plugin): (re)write the card.

    A missing card, or one hf-slicegpt generated, is rebuilt from what the directory now holds, so a re-save
    (``merge_and_unload``, resharding, ``save_pretrained`` from Python) keeps ``base_model``, the license and
    the source from ``config.json``. A card someone edited (no generated marker) is left alone. A save never
    fails because of its card: a directory that is not a complete checkpoint yet is skipped.
    """
    directory = Path(directory)
    if not is_generated_card(directory):
        return None
    try:
        return write_model_card(directory)
    except (InvalidCheckpointError, OSError, ValueError) as exc:
        logger.info("No model card written in %s: %s", directory, exc)
        return None


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


@dataclass
class PushPlan:
    """What :func:`push` uploads (or, with ``dry_run``, would upload)."""

    directory: Path
    repo_id: str
    kind: CheckpointKind
    files: list[str]
    card_metadata: dict[str, Any]
    card_refreshed: bool
    revision: str | None = None
    private: bool = False
    create_pr: bool = False
    warnings: list[str] = field(default_factory=list)
    commit_url: str | None = None
    pr_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "repo_id": self.repo_id,
            "kind": self.kind,
            "files": self.files,
            "card_metadata": self.card_metadata,
            "card_refreshed": self.card_refreshed,
            "revision": self.revision,
            "private": self.private,
            "create_pr": self.create_pr,
            "warnings": self.warnings,
            "commit_url": self.commit_url,
            "pr_url": self.pr_url,
        }


def push(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
    refresh_card: bool = True,
    allow_files: Sequence[str] = (),
    allow_incomplete: bool = False,
    api: HfApi | None = None,
) -> PushPlan:
    """Upload a sliced checkpoint or adapter directory to the Hub repo ``repo_id`` (created if missing).

    The directory is validated first, as ``info`` does (:func:`checkpoint_kind`, then
    :func:`~hf_slicegpt.checkpoint.validation.validate_checkpoint` for a sliced checkpoint: widths, shapes,
    shortcut flags, dtypes), and files that can run code on the downloader are refused (:func:`unsafe_files`)
    unless named in ``allow_files`` (``--allow-file``): never publish a broken or dangerous checkpoint. What
    ``save_pretrained`` alone leaves out is named (:func:`incomplete_parts`): a sliced checkpoint without a
    tokenizer is refused unless ``allow_incomplete``; a missing report is a warning (the card then has no
    measured figures). A missing ``README.md``, or one hf-slicegpt generated, is (re)written with ``repo_id`` in
    its usage snippets unless ``refresh_card=False``. ``dry_run`` touches neither the network nor the
    directory: it returns the files, the card metadata and the warnings.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    directory = Path(directory)
    kind = checkpoint_kind(directory)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"invalid --repo-id {repo_id!r}: {exc}; use ORG/NAME") from exc
    if create_pr and revision is not None and revision.startswith("refs/pr/"):
        raise PushError("create_pr opens a new pull request; do not also pass a refs/pr/ revision")

    missing = incomplete_parts(directory, kind)
    if missing.get("tokenizer") and kind == "sliced" and not allow_incomplete:
        raise PushError(
            f"{str(directory)!r} has no tokenizer ({missing['tokenizer']}): nobody could encode text for this "
            "model. Save the original model's into it with AutoTokenizer.from_pretrained(ORIGINAL)"
            ".save_pretrained(DIR), or push anyway with --allow-incomplete (allow_incomplete=True)"
        )
    if not refresh_card and not (directory / CARD_NAME).is_file():
        raise PushError(f"{str(directory)!r} has no {CARD_NAME} to keep: drop --keep-card to generate one")
    warnings = [f"{str(directory)!r} has no {what}" for what in missing.values()]
    if kind == "sliced":
        from .validation import validate_checkpoint

        warnings += validate_checkpoint(directory).warnings
    if kind == "adapter":
        base = (read_json_file(directory / "adapter_config.json") or {}).get("base_model_name_or_path")
        if not _is_repo_id(base):
            warnings.append(
                f"adapter_config.json names the base model {base!r}, which is not a Hub id: others cannot load "
                "this adapter until base_model_name_or_path names the sliced model's repo"
            )
    refresh = refresh_card and is_generated_card(directory)
    if refresh:
        card = build_model_card(directory, repo_id=repo_id)
    else:
        card = ModelCard.load(directory / CARD_NAME, ignore_metadata_errors=True)
    files = upload_files(directory)
    refused = [name for name in unsafe_files(directory, files) if name not in set(allow_files)]
    if refused:
        raise PushError(
            f"refusing to upload {', '.join(refused)} from {str(directory)!r}: pickles run code when loaded, and a "
            ".py that is not hf-slicegpt's own remote code runs under trust_remote_code=True. Delete them, or name "
            "each with --allow-file NAME (allow_files=) if you mean to publish it"
        )
    if CARD_NAME not in files:
        files = sorted([*files, CARD_NAME])
    plan = PushPlan(
        directory=directory,
        repo_id=repo_id,
        kind=kind,
        files=files,
        card_metadata=card.data.to_dict(),
        card_refreshed=refresh,
        revision=revision,
        private=private,
        create_pr=create_pr,
        warnings=warnings,
    )
    for warning in warnings:
        logger.warning(warning)
    if dry_run:
        return plan

    logger.info("Uploading %d files to %s: %s", len(files), repo_id, ", ".join(files))
    if refresh:
        card.save(directory / CARD_NAME)
        logger.info("Refreshed %s for %s", directory / CARD_NAME, repo_id)
    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if revision is not None and not create_pr and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message
        or f"Upload {'sliced model' if kind == 'sliced' else 'LoRA adapter'} with hf-slicegpt",
        allow_patterns=[glob.escape(f) for f in files],
        token=token,
    )
    plan.repo_id = repo_id
    plan.commit_url = getattr(info, "commit_url", None)
    plan.pr_url = getattr(info, "pr_url", None)
    logger.info("Pushed %d files to %s (%s)", len(files), repo_id, plan.pr_url or plan.commit_url)
    return plan


__all__ = [
    "CARD_NAME",
    "GENERATED_MARKER",
    "InvalidCheckpointError",
    "PushError",
    "PushPlan",
    "ZEROSHOT_NAME",
    "base_model_license",
    "build_model_card",
    "checkpoint_kind",
    "hub_base_model",
    "hub_dataset",
    "incomplete_parts",
    "is_generated_card",
    "push",
    "unsafe_files",
    "upload_files",
    "write_card_after_save",
    "write_model_card",
]
