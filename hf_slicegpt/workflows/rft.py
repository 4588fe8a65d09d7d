"""Recovery fine-tuning (RFT): LoRA on a sliced model, trained by ``transformers.Trainer``.

Slicing removes whole directions of the residual stream; a short LoRA fine-tune on ordinary text recovers much
of the lost quality (SliceGPT, arXiv 2401.15024, section 4: r=32, alpha=10, dropout 0.05 on every attention and
MLP linear, sequences of 1024 tokens). This module wires PEFT and ``Trainer`` together for the sliced
architecture and writes the result either merged (a plain sliced checkpoint) or as a PEFT adapter.

``import hf_slicegpt`` registers the default LoRA targets of the sliced model type with PEFT
(:func:`register_peft_targets`), so ``LoraConfig()`` without ``target_modules`` works on a sliced model.

Multi-GPU data parallel comes from ``Trainer`` itself: run the same command under ``torchrun`` or
``accelerate launch`` (``torchrun --nproc-per-node 4 -m hf_slicegpt.cli rft ...``). Every rank trains on its
share of the batches and measures perplexity; only the main process writes the output.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import lora_target_names
from ..checkpoint.names import REPORT_NAME as SLICING_REPORT_NAME
from ..checkpoint.names import RFT_REPORT_NAME as REPORT_NAME
from ..checkpoint.report import read_json_file
from ..errors import SliceGPTError
from ..modeling.configuration_sliced import SlicedConfig

logger = logging.getLogger(__name__)

MODEL_TYPE = SlicedConfig.model_type
REPORT_FORMAT = 1
_ABSENT = object()
# What Trainer writes into its output directory here (report_to="none"): checkpoints, and their temporaries.
_TRAINER_ENTRY = re.compile(r"(tmp-)?checkpoint-\d+")

# Linear layers inside a sliced block, under the names each family gives them (the sliced model keeps the
# family's attention and MLP modules): derived from the registered adapters, so a new family brings its own.
ATTENTION_LINEARS, MLP_LINEARS = lora_target_names()
# The residual shortcut matrices slicing adds. Trainable too, but only on request (the paper did not).
SHORTCUT_LINEARS: tuple[str, ...] = ("attn_shortcut", "mlp_shortcut")

# PEFT's default for model_type "slicegpt": every attention and MLP linear of every decoder block, and nothing
# else (never the embeddings, their projections, the shortcuts or the head). A regular expression, because a
# bare name such as ``dense`` would also match outside the blocks in some families.
PEFT_TARGET_PATTERN = (
    r".*\.layers\.\d+\.(self_attn\.("
    + "|".join(ATTENTION_LINEARS)
    + r")|mlp\.("
    + "|".join(MLP_LINEARS)
    + r"))"
)


def register_peft_targets() -> None:
    """Teach PEFT the default target modules of the sliced model type.

    PEFT looks up ``target_modules=None`` in ``TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING`` by
    ``model.config.model_type``. The LoRA mapping, and every mapping PEFT copied from it (LoHa, LoKr, ...,
    recognised by their identical ``llama`` entry), get an entry for ``slicegpt``. Tuner classes hold a
    reference to their mapping, so adding the key in place is enough.
    """
    try:
        from peft.utils import constants
    except ImportError:  # peft is a dependency, but keep `import hf_slicegpt` working without it
        return
    lora = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    reference = lora.get("llama")
    for name in dir(constants):
        mapping = getattr(constants, name)
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_TARGET_MODULES_MAPPING")):
            continue
        if isinstance(mapping, dict) and (mapping is lora or mapping.get("llama") == reference):
            mapping.setdefault(MODEL_TYPE, PEFT_TARGET_PATTERN)


def default_target_modules(model: nn.Module, *, shortcuts: bool = False) -> list[str] | str:
    """The LoRA targets RFT uses by default: every attention and MLP linear of ``model``.

    For a sliced model, the family's reader and writer names recorded in its config (exactly the modules
    :data:`PEFT_TARGET_PATTERN` matches); ``shortcuts=True`` adds the shortcut matrices. Any other model gets
    PEFT's ``"all-linear"`` (every linear but the output layer).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != MODEL_TYPE:
        if shortcuts:
            raise RFTError(
                "target_shortcuts applies to sliced models only; this model has no shortcut matrices"
            )
        return "all-linear"
    names = [
        *config.attn_input_names,
        config.attn_output_name,
        *config.mlp_input_names,
        config.mlp_output_name,
    ]
    if shortcuts:
        names += list(SHORTCUT_LINEARS)
    present = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = list(dict.fromkeys(n for n in names if n in present))
    if not targets:
        raise RFTError(
            f"found no attention/MLP linears to adapt in {type(model).__name__}; pass target_modules explicitly"
        )
    return targets


class RFTError(SliceGPTError):
    """Recovery fine-tuning cannot run with these settings or inputs."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RFTError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RFTConfig:
    """Settings of a recovery fine-tuning run. Defaults follow the SliceGPT paper where it gives them.

    Example:

    ```python
    >>> from hf_slicegpt.workflows.rft import RFTConfig
    >>> RFTConfig(max_steps=100, seq_len=256).lora_config(["q_proj", "v_proj"]).r
    32
    ```
    """

    r: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=10.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex; None: every attention and MLP linear"}
    )
    target_shortcuts: bool = field(default=False, metadata={"help": "also adapt the shortcut matrices"})
    num_samples: int = field(default=1024, metadata={"help": "training sequences drawn from the data"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per training sequence"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training sequences"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler type"})
    warmup_steps: float = field(default=0, metadata={"help": "warmup steps (int), or a ratio in [0, 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=1, metadata={"help": "sequences per device per step"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    merge: bool = field(default=True, metadata={"help": "merge LoRA into the weights (else save an adapter)"})
    seed: int = field(default=42, metadata={"help": "picks the training windows and seeds training"})
    logging_steps: int = field(default=10, metadata={"help": "log the loss every N steps"})
    save_steps: int = field(
        default=100, metadata={"help": "write a resumable Trainer checkpoint every N steps"}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Trainer checkpoints kept"})
    eval_seq_len: int | None = field(default=None, metadata={"help": "perplexity window (default seq_len)"})
    eval_max_tokens: int | None = field(default=None, metadata={"help": "cap the perplexity tokens"})
    eval_batch_size: int = field(default=4, metadata={"help": "windows per perplexity forward pass"})
    use_cpu: bool = field(default=False, metadata={"help": "train on CPU even if a GPU is visible"})

    def __post_init__(self) -> None:
        _check(_is_int(self.r) and self.r >= 1, f"r must be an integer >= 1, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("num_samples", "seq_len", "batch_size", "grad_accum", "logging_steps", "save_steps"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(
            self.seq_len >= 2,
            f"seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {self.seq_len}",
        )
        _check(
            self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1),
            f"max_steps must be an integer >= 1 or None, got {self.max_steps!r}",
        )
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}")
        _check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            f"learning_rate must be > 0, got {self.learning_rate!r}",
        )
        _check(
            self.warmup_steps >= 0 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()),
            f"warmup_steps must be a whole number of steps or a ratio in [0, 1), got {self.warmup_steps!r}",
        )
        if self.eval_seq_len is not None:
            _check(
                _is_int(self.eval_seq_len) and self.eval_seq_len >= 2,
                f"eval_seq_len must be an integer >= 2, got {self.eval_seq_len!r}",
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            _check(
                bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
                f"target_modules must be non-empty names, got {self.target_modules!r}",
            )

    def lora_config(self, target_modules: list[str] | str) -> Any:
        """The ``peft.LoraConfig`` for these settings."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class RFTResult:
    """What :func:`rft` produced: the trained model (merged, or the ``PeftModel``), the report, the output."""

    model: nn.Module
    report: dict[str, Any]
    output_dir: Path | None


class _Windows(torch.utils.data.Dataset):
    """Fixed-length token windows as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, ids: torch.LongTensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.ids[index]
        return {"input_ids": row, "labels": row.clone()}


def _check_windows(ids: Any, what: str, vocab_size: int | None) -> torch.LongTensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise RFTError(
            f"{what} must be a (n_windows, seq_len >= 2) tensor of token ids or a source name, got {shape}"
        )
    if ids.is_floating_point() or ids.is_complex():
        raise RFTError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise RFTError(f"{what} has token ids outside [0, {vocab_size}): wrong tokenizer for this model?")
    return ids.long()


def _base_model_ref(model: nn.Module, base_model_path: str | os.PathLike | None) -> str | None:
    """Where the base sliced model can be loaded from: an absolute local directory or a Hub id."""
    candidate = str(base_model_path or getattr(model, "name_or_path", "") or "")
    if not candidate:
        return None
    path = Path(candidate)
    if (path / "config.json").is_file():
        return str(path.absolute())
    if path.exists() or candidate.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(candidate)
    except HFValidationError:
        return None
    return candidate


def _perplexity(model: nn.Module, ids: torch.LongTensor | None, batch_size: int, show_progress: bool):
    if ids is None:
        return None
    from .evaluation import perplexity

    return perplexity(model, ids, batch_size=batch_size, show_progress=show_progress)


def _loss_log(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm")
    return [{k: entry[k] for k in keep if k in entry} for entry in history if "loss" in entry]


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("hf-slicegpt", "torch", "transformers", "peft", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_report(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``rft_report.json`` of an RFT output directory, or ``None``."""
    return read_json_file(Path(directory) / REPORT_NAME)


def rft(
    model: PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    train_data: str | torch.LongTensor,
    output_dir: str | os.PathLike | None,
    config: RFTConfig | None = None,
    *,
    eval_data: str | torch.LongTensor | None = None,
    evaluate: bool = True,
    text_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    base_model_path: str | os.PathLike | None = None,
    callbacks: Sequence[Any] = (),
    show_progress: bool = True,
) -> RFTResult:
    """Fine-tune ``model`` with LoRA on ``train_data`` and save it to ``output_dir``.

    Args:
        model: a sliced model (any causal LM works, with ``target_modules``), or a checkpoint path. It is
            consumed: LoRA layers are injected in place.
        tokenizer: the model's tokenizer (loaded with a path ``model`` when ``None``). It reads a text source and
            is saved beside the result.
        train_data: a text source (``pydocs``, ``wikitext2``, a local file, ...; its training part is used) or
            token windows ``(n, seq_len)``.
        output_dir: where the result goes, written atomically. ``None`` keeps it in memory only.
        config: hyper-parameters (:class:`RFTConfig`); ``config.merge`` chooses a merged sliced checkpoint or a
            PEFT adapter.
        eval_data: source or windows for perplexity before and after; default: the held-out part of
            ``train_data`` when it is a source.
        evaluate: ``False`` skips the perplexity measurements.
        text_column, split, subset: how to read a Hub or tabular ``train_data`` (see :mod:`hf_slicegpt.workflows.data`).
        checkpoint_dir: Trainer checkpoints for resuming (default: ``<output_dir>.rft-checkpoints``).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (starts fresh if there is none).
        keep_checkpoints: keep ``checkpoint_dir`` after success (default: removed).
        overwrite: replace a non-empty ``output_dir`` and discard stale checkpoints.
        base_model_path: the sliced checkpoint an adapter refers to (``merge=False``); default: where ``model``
            was loaded from.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        show_progress: tqdm bars (Trainer's and perplexity's); without them the loss is logged.

    Returns:
        :class:`RFTResult` with the merged model (or the ``PeftModel``) and the report, also written to
        ``output_dir/rft_report.json``.
    """
    config = config or RFTConfig()
    model, tokenizer, source = _resolve_model(model, tokenizer)
    # Everything cheap is checked before the first training step.
    base_ref = _check_request(
        model, tokenizer, config, train_data, eval_data, output_dir, overwrite, base_model_path, source
    )
    targets = _targets(model, config)
    read = {"text_column": text_column, "split": split, "subset": subset}
    train_ids = _train_windows(model, tokenizer, config, train_data, read)
    eval_source = (
        eval_data if eval_data is not None else (train_data if isinstance(train_data, str) else None)
    )
    eval_ids = None
    if evaluate:
        eval_ids = _eval_windows(model, tokenizer, config, eval_source, read, own_split=eval_data is None)
    inputs = [source, base_model_path, train_data, eval_data]
    checkpoint_dir, last = _checkpoints(checkpoint_dir, output_dir, resume, overwrite, inputs)
    run = _Run(
        model=model,
        tokenizer=tokenizer,
        config=config,
        targets=targets,
        train_ids=train_ids,
        eval_ids=eval_ids,
        output_dir=output_dir,
        checkpoint_dir=checkpoint_dir,
        resume_from=last,
        keep_checkpoints=keep_checkpoints,
        overwrite=overwrite,
        base_ref=base_ref,
        source=source,
        data={
            "train": train_data if isinstance(train_data, str) else "<token windows>",
            "eval": eval_source if isinstance(eval_source, str) or eval_source is None else "<token windows>",
        },
        callbacks=callbacks,
        show_progress=show_progress,
    )
    return _train(run)


def _resolve_model(model: Any, tokenizer: Any) -> tuple[PreTrainedModel, Any, str]:
    """The model (loaded when a path is given, with its tokenizer unless one is passed) and its name."""
    source = None
    if isinstance(model, (str, os.PathLike)):
        from .loading import load_model_and_tokenizer

        source = str(model)
        model, loaded_tokenizer = load_model_and_tokenizer(model)
        tokenizer = tokenizer or loaded_tokenizer
    if not isinstance(model, PreTrainedModel):
        raise RFTError(
            f"model must be a transformers PreTrainedModel or a checkpoint path, got {type(model).__name__}"
        )
    return model, tokenizer, source or getattr(model, "name_or_path", "") or type(model).__name__


def _check_request(
    model: PreTrainedModel,
    tokenizer: Any,
    config: RFTConfig,
    train_data: Any,
    eval_data: Any,
    output_dir: str | os.PathLike | None,
    overwrite: bool,
    base_model_path: str | os.PathLike | None,
    source: str,
) -> str | None:
    """The checks that need no data or training; returns where an adapter's base model is found."""
    from ..checkpoint.io import check_output_dir

    if output_dir is not None:
        check_output_dir(output_dir, overwrite, inputs=[source, base_model_path, train_data, eval_data])
    base_ref = _base_model_ref(model, base_model_path)
    if not config.merge and output_dir is not None and base_ref is None:
        raise RFTError(
            "an unmerged adapter must name the sliced checkpoint it applies to, but this model was not loaded "
            "from a checkpoint directory; save the sliced model first and pass base_model_path=DIR "
            "(or merge=True)"
        )
    model_type = getattr(model.config, "model_type", None)
    if output_dir is not None and model_type != MODEL_TYPE:
        raise RFTError(
            f"{source!r} is a {model_type!r} model, not a sliced one: RFT writes sliced checkpoints (model_type "
            f"{MODEL_TYPE!r}); slice it first with `hf-slicegpt slice` (in Python, output_dir=None keeps a "
            "fine-tuned model of any type in memory)"
        )
    for text_source in (train_data, eval_data):
        if isinstance(text_source, str) and text_source == "":
            raise RFTError("a data source name must not be empty")
    if (isinstance(train_data, str) or isinstance(eval_data, str)) and tokenizer is None:
        raise RFTError("reading a text source needs the model's tokenizer; pass tokenizer=")
    return base_ref


def _targets(model: PreTrainedModel, config: RFTConfig) -> list[str] | str:
    """The LoRA targets: the configured ones (plus the shortcuts on request), or the model type's defaults."""
    targets = config.target_modules or default_target_modules(model, shortcuts=config.target_shortcuts)
    if config.target_modules and config.target_shortcuts and isinstance(targets, list):
        targets = targets + [n for n in SHORTCUT_LINEARS if n not in targets]
    return targets


def _train_windows(
    model: PreTrainedModel, tokenizer: Any, config: RFTConfig, train_data: Any, read: dict[str, Any]
) -> torch.LongTensor:
    """Training windows: drawn from a source's training part, or the given token windows, checked."""
    if not isinstance(train_data, str):
        return _check_windows(train_data, "train_data", getattr(model.config, "vocab_size", None))
    from .data import calibration_tokens

    return calibration_tokens(
        tokenizer,
        train_data,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        seed=config.seed,
        **read,
    )


def _eval_windows(
    model: PreTrainedModel,
    tokenizer: Any,
    config: RFTConfig,
    eval_source: Any,
    read: dict[str, Any],
    own_split: bool,
) -> torch.LongTensor | None:
    """Perplexity windows: a source's held-out part (``own_split``: the training source, read with its split),
    the given token windows, or ``None`` when there is nothing to evaluate on."""
    if eval_source is None:
        logger.info("No evaluation source (training windows were given as a tensor); skipping perplexity")
        return None
    if not isinstance(eval_source, str):
        return _check_windows(eval_source, "eval_data", getattr(model.config, "vocab_size", None))
    from .data import evaluation_tokens, load_text

    read = {**read, "split": read["split"] if own_split else None}
    load_text(eval_source, purpose="evaluation", **read)
    return evaluation_tokens(
        tokenizer,
        eval_source,
        seq_len=config.eval_seq_len or config.seq_len,
        max_tokens=config.eval_max_tokens,
        **read,
    )


def _checkpoints(
    checkpoint_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike | None,
    resume: bool,
    overwrite: bool,
    inputs: Sequence[Any] = (),
) -> tuple[Path, str | None]:
    """Trainer's checkpoint directory and the checkpoint to resume from: an earlier run's checkpoints are
    resumed (``resume``), discarded (``overwrite``), or refused."""
    if checkpoint_dir is None:
        if output_dir is None:
            raise RFTError("checkpoint_dir is needed when output_dir is None")
        out = Path(output_dir).absolute()
        checkpoint_dir = out.parent / f"{out.name}.rft-checkpoints"
    checkpoint_dir = Path(checkpoint_dir)
    _check_checkpoint_dir(checkpoint_dir, output_dir, inputs)
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if last is not None and not resume:
        if not overwrite:
            raise RFTError(
                f"{str(checkpoint_dir)!r} holds checkpoints of an earlier run (newest: {Path(last).name}); pass "
                "resume=True (--resume) to continue it, or overwrite=True (--overwrite) to start over"
            )
        logger.warning("Discarding earlier checkpoints in %s", checkpoint_dir)
        _remove_checkpoints(checkpoint_dir)
        last = None
    if resume and last is None:
        logger.warning("Nothing to resume in %s; starting from step 0", checkpoint_dir)
    return checkpoint_dir, last


def _check_checkpoint_dir(checkpoint_dir: Path, output_dir: Any, inputs: Sequence[Any]) -> None:
    """The checkpoint directory is emptied after a successful run, so it must be one of its own: not a file,
    the current directory, the output or an input, nor contain one or lie inside the output, and holding
    nothing but Trainer checkpoints."""
    name = str(checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise RFTError(
            f"checkpoint directory {name!r} exists and is not a directory; choose another (--checkpoint-dir)"
        )
    resolved = checkpoint_dir.resolve()
    cwd = Path.cwd().resolve()
    if cwd == resolved or cwd.is_relative_to(resolved):
        raise RFTError(
            f"checkpoint directory {name!r} is or contains the current directory; choose a new one (--checkpoint-dir)"
        )
    # The output is written by replacing its directory: the checkpoints may not be, contain or lie inside it.
    # An input may not be, or lie inside, the checkpoints (an input directory may hold them).
    places = [(output_dir, True), *((source, False) for source in inputs)]
    for other, inside in places:
        if (
            not isinstance(other, (str, os.PathLike))
            or not str(other)
            or (not inside and not os.path.exists(other))
        ):
            continue
        path = Path(other).resolve()
        if resolved == path or path.is_relative_to(resolved) or (inside and resolved.is_relative_to(path)):
            where = "is, contains or lies inside the output" if inside else "is or contains the input"
            raise RFTError(
                f"checkpoint directory {name!r} {where} {str(other)!r}, and it is emptied after training; choose "
                "a directory of its own (--checkpoint-dir)"
            )
    foreign = (
        sorted(p.name for p in checkpoint_dir.iterdir() if not _TRAINER_ENTRY.fullmatch(p.name))
        if checkpoint_dir.is_dir()
        else []
    )
    if foreign:
        raise RFTError(
            f"checkpoint directory {name!r} holds files other than Trainer checkpoints ({', '.join(foreign[:3])}), "
            "and it is emptied after training; choose a new or empty directory (--checkpoint-dir)"
        )


def _remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete Trainer's checkpoints (nothing else), then the directory if that left it empty."""
    if not checkpoint_dir.is_dir():
        return
    for entry in checkpoint_dir.iterdir():
        if _TRAINER_ENTRY.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoint_dir.rmdir()


@dataclass
class _Run:
    """One checked RFT run: the model, its windows, and where it writes."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    config: RFTConfig
    targets: list[str] | str
    train_ids: torch.LongTensor
    eval_ids: torch.LongTensor | None
    output_dir: str | os.PathLike | None
    checkpoint_dir: Path
    resume_from: str | None
    keep_checkpoints: bool
    overwrite: bool
    base_ref: str | None
    source: str
    data: dict[str, Any]
    callbacks: Sequence[Any]
    show_progress: bool


def _training_arguments(config: RFTConfig, checkpoint_dir: Path, show_progress: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=int(config.warmup_steps) if config.warmup_steps >= 1 else config.warmup_steps,
        weight_decay=config.weight_decay,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        bf16=config.bf16,
        use_cpu=config.use_cpu,
        seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=not show_progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not config.use_cpu,
    )


def _loss_logger() -> Any:
    """A callback that logs the loss through ``logging`` (stderr): Trainer prints its log dicts to stdout,
    which must stay clean for ``--json``."""
    from transformers import TrainerCallback

    class _LogLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - Trainer's signature
            if logs and "loss" in logs and state.is_world_process_zero:
                logger.info(
                    "step %d/%d: loss %.4f, lr %.3g",
                    state.global_step,
                    state.max_steps,
                    logs["loss"],
                    logs.get("learning_rate", float("nan")),
                )

    return _LogLoss()


def _quiet_trainer(trainer: Any) -> None:
    """No ``print``-style log lines from Trainer: its progress bar only."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - Trainer's signature
            return

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_BarOnly())


def _train(run: _Run) -> RFTResult:
    """Measure, train LoRA with ``Trainer``, measure again, merge (or keep the adapter) and write."""
    from peft import get_peft_model
    from transformers import Trainer, default_data_collator, set_seed

    config, model = run.config, run.model
    args = _training_arguments(config, run.checkpoint_dir, run.show_progress)
    model.to(args.device)
    use_cache = model.config.__dict__.get("use_cache", _ABSENT)
    model.config.use_cache = False  # no KV cache while training; restored before saving

    # Every rank measures (ranks stay in step; the main process reports): LoRA starts at zero, so the base
    # model's perplexity is the starting point.
    before = _perplexity(model, run.eval_ids, config.eval_batch_size, run.show_progress)
    if before is not None:
        logger.info("Perplexity before RFT: %.4f", before.perplexity)
    set_seed(config.seed)  # LoRA's random init: the same seed gives the same run, interrupted or not
    peft_model = get_peft_model(model, config.lora_config(run.targets))
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d alpha=%g on %s: %s trainable of %s parameters",
        config.r, config.lora_alpha, run.targets, f"{trainable:,}", f"{total:,}",
    )  # fmt: skip
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=_Windows(run.train_ids),
        data_collator=default_data_collator,
        callbacks=[_loss_logger(), *run.callbacks],
    )
    _quiet_trainer(trainer)
    if run.resume_from:
        logger.info("Resuming from %s", run.resume_from)
    output = trainer.train(resume_from_checkpoint=run.resume_from)
    peft_model.eval()
    after = _perplexity(peft_model, run.eval_ids, config.eval_batch_size, run.show_progress)
    if after is not None:
        logger.info("Perplexity after RFT: %.4f (before: %.4f)", after.perplexity, before.perplexity)
    report = _report(run, trainer, output, (trainable, total), before, after)
    result_model = _result_model(run, peft_model)
    if use_cache is _ABSENT:
        del model.config.use_cache
    else:
        model.config.use_cache = use_cache
    written = _write(run, result_model, report) if trainer.is_world_process_zero() else None
    trainer.accelerator.wait_for_everyone()
    return RFTResult(model=result_model, report=report, output_dir=written)


def _report(
    run: _Run, trainer: Any, output: Any, parameters: tuple[int, int], before: Any, after: Any
) -> dict[str, Any]:
    """``rft_report.json``: settings, data, training log, and the perplexity before and after."""
    settings = asdict(run.config)
    settings["target_modules"] = run.targets if isinstance(run.targets, str) else list(run.targets)
    resumed = run.resume_from
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": run.source,
        "base_model_path": run.base_ref,
        "data": run.data,
        "settings": settings,
        "merged": run.config.merge,
        "parameters": {"trainable": int(parameters[0]), "total": int(parameters[1])},
        "training": {
            "global_step": int(output.global_step),
            "train_loss": float(output.training_loss),
            "runtime_s": round(float(output.metrics.get("train_runtime", 0.0)), 3),
            "sequences": int(run.train_ids.shape[0]),
            "seq_len": int(run.train_ids.shape[1]),
            "world_size": int(trainer.args.world_size),
            "resumed_from": Path(resumed).name if resumed else None,
            "log": _loss_log(trainer.state.log_history),
        },
        "perplexity": None,
        "versions": _versions(),
    }
    if before is not None and after is not None:
        report["perplexity"] = {
            "data": run.data["eval"],
            "seq_len": after.seq_len,
            "tokens": after.tokens,
            "before": before.perplexity,
            "after": after.perplexity,
            "before_nll": before.nll,
            "after_nll": after.nll,
        }
    return report


def _result_model(run: _Run, peft_model: Any) -> nn.Module:
    """The merged sliced model, or the ``PeftModel`` pointing at its base checkpoint, in eval mode."""
    if run.config.merge:
        result = peft_model.merge_and_unload()
    else:
        result = peft_model
        if run.base_ref is not None:
            # AutoPeftModelForCausalLM.from_pretrained(DIR) loads the base from here; an absolute local path
            # works offline (for the Hub, point it at the sliced model's repo id before pushing).
            peft_model.peft_config["default"].base_model_name_or_path = run.base_ref
    result.eval()
    return result


def _write(run: _Run, result_model: nn.Module, report: dict[str, Any]) -> Path | None:
    """Write the result atomically with its tokenizer, reports and card; drop Trainer's checkpoints."""
    if run.output_dir is None:
        return None
    from ..checkpoint.hub import write_model_card
    from ..checkpoint.io import write_checkpoint

    output_dir = run.output_dir

    def write(directory: Path) -> None:
        result_model.save_pretrained(directory)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(directory)
        base_dir = Path(run.base_ref) if run.base_ref is not None else None
        if run.config.merge and base_dir is not None and (base_dir / SLICING_REPORT_NAME).is_file():
            # The merged model is the same sliced architecture: keep how it was sliced beside it.
            shutil.copy2(base_dir / SLICING_REPORT_NAME, directory / SLICING_REPORT_NAME)
        (directory / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        write_model_card(directory, name=Path(output_dir).name)

    written = write_checkpoint(output_dir, write, overwrite=run.overwrite)
    if not run.keep_checkpoints:
        _remove_checkpoints(run.checkpoint_dir)
    kind = "merged sliced checkpoint" if run.config.merge else "PEFT adapter"
    logger.info("Wrote %s (%s)", written, kind)
    return written


__all__ = [
    "ATTENTION_LINEARS",
    "MLP_LINEARS",
    "PEFT_TARGET_PATTERN",
    "REPORT_NAME",
    "RFTConfig",
    "RFTError",
    "RFTResult",
    "SHORTCUT_LINEARS",
    "default_target_modules",
    "read_report",
    "register_peft_targets",
    "rft",
]
