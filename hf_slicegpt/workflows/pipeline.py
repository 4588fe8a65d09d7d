"""The slicing pipeline behind ``hf-slicegpt slice``, callable from Python.

:func:`run_slice` loads a model, builds the calibration windows, (evaluates,) slices, (evaluates,) and saves the
checkpoint atomically with its tokenizer, report and model card; ``job.low_memory`` streams the blocks from
safetensors shards instead, and under ``torchrun`` each rank calibrates on its share. The CLI only parses
arguments into a :class:`SliceJob` and prints the summary.

Example (the offline demo model, 8 calibration windows of 128 tokens):

```python
>>> from hf_slicegpt import SliceJob, SlicingConfig, run_slice
>>> result = run_slice(SliceJob("smollm2", "out/smollm2-25", SlicingConfig(sparsity=0.25),
...                             calibration="pydocs", num_samples=8, seq_len=128))  # doctest: +SKIP
>>> result.report["parameters"]["sliced_fraction"]  # doctest: +SKIP
```
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import SliceGPTError
from ..runtime.offload import check_offload
from ..slicing import SlicingConfig, slice_model
from .broadmix import BROAD_FRACTION, BROAD_KINDS, check_broad_mix
from .loading import DTYPES, capped_seq_len, resolve_device

logger = logging.getLogger(__name__)


@dataclass
class SliceJob:
    """Everything one slicing run needs; recorded as ``settings`` in the report."""

    model: str
    output: str
    config: SlicingConfig
    calibration: str = "wikitext2"
    num_samples: int = 128
    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 42
    dtype: str | None = None
    device: str | None = None
    text_column: str | None = None
    split: str | None = None
    subset: str | None = None
    eval_data: str | None = None
    eval_split: str | None = None
    eval_max_tokens: int | None = None
    eval_batch_size: int = 1
    plots: bool = False
    overwrite: bool = False
    # Performance and scale: activations offload, the low-memory (streaming) path, resumable runs.
    offload: str | None = None
    low_memory: bool = False
    checkpoint_every: int = 0
    resume: bool = False
    # Out-of-domain robustness: "self:N" adds N sequences sampled from the dense model to the calibration,
    # "swap:F" vocabulary-swapped copies of the windows; calibration_mix draws a share of the windows from
    # other sources, as (source, fraction) pairs.
    calibration_augment: str | None = None
    calibration_mix: list[tuple[str, float]] = field(default_factory=list)
    # The built-in broad mix (workflows.broadmix): this share of the windows per built-in kind of text (Python
    # source, structured records, the installed packages' READMEs and licences) replaces calibration windows, so that no calibration set is one kind of text
    # only. 0 turns it off (the paper's calibration).
    broad_mix: float = BROAD_FRACTION
    # "sliced" (the plugin format) or "native" (the family's own architecture; needs --rotation global).
    export: str = "sliced"
    # Run code shipped with the model or tokenizer (an auto_map): only when the user asks for it.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields, naming the bad one: when the job is made, and again when it runs (a field may have
        been set since), so that a mistake fails at once, not after slicing.

        A sparsity in place of the config becomes ``SlicingConfig(sparsity=...)``, as in ``slice_model``; a
        ``torch.dtype`` becomes its name, as the report records it.
        """
        if isinstance(self.config, (int, float)) and not isinstance(self.config, bool):
            self.config = SlicingConfig(sparsity=float(self.config))
        if not isinstance(self.config, SlicingConfig):
            raise SliceJobError(
                f"config must be a SlicingConfig (or a sparsity), got {type(self.config).__name__}"
            )
        for name in ("model", "output"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise SliceJobError(f"{name} must be a non-empty path or name, got {value!r}")
            setattr(self, name, str(value))
        for name, least in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1), ("eval_batch_size", 1),
                            ("checkpoint_every", 0), ("seed", None)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
                wanted = "an integer" if least is None else f"an integer >= {least}"
                raise SliceJobError(f"{name} must be {wanted}, got {value!r}")
        if self.eval_max_tokens is not None and (
            not isinstance(self.eval_max_tokens, int) or self.eval_max_tokens < 2
        ):
            raise SliceJobError(
                f"eval_max_tokens must be None or an integer >= 2, got {self.eval_max_tokens!r}"
            )
        self.dtype = _dtype_name(self.dtype)
        self.offload = check_offload(self.offload)
        check_broad_mix(self.broad_mix)
        if self.export not in ("sliced", "native"):
            raise SliceJobError(f"export must be 'sliced' or 'native', got {self.export!r}")


class SliceJobError(SliceGPTError):
    """A :class:`SliceJob` field of the wrong type or value."""


def _dtype_name(dtype: Any) -> str | None:
    """``None``, or the name of a dtype the loader knows (``torch.bfloat16`` -> ``"bfloat16"``)."""
    names = {value: key for key, value in DTYPES.items()}
    name = names.get(dtype, dtype)
    if name is not None and name not in DTYPES:
        raise SliceJobError(f"dtype must be None or one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


@dataclass
class SliceResult:
    model: Any  # SlicedModelForCausalLM
    tokenizer: Any
    report: dict[str, Any]
    output: Path


def job_settings(
    job: SliceJob, seq_len: int, device: Any, broad_kinds: list[str] | None = None
) -> dict[str, Any]:
    """The job as the report records it: run settings and the slicing config, flat (``sparsity`` at the top).

    ``broad_kinds``: the kinds the broad mix really put in (``[]`` when it was skipped: ``broad_mix`` then
    reads 0 and ``broad_mix_skipped`` says so); ``None`` assumes the job's request was met.
    """
    settings = asdict(job)
    settings.pop("overwrite")
    settings.update(settings.pop("config"))
    settings.update(seq_len=seq_len, device=str(device))
    kinds = list(BROAD_KINDS) if broad_kinds is None else broad_kinds
    if job.broad_mix and kinds:
        settings["broad_mix_kinds"] = kinds
    elif job.broad_mix:
        settings["broad_mix"] = 0.0
        settings["broad_mix_skipped"] = (
            f"{job.broad_mix:g} of the windows per kind asked for, but not mixed in: too few windows (it would "
            "have replaced more than half of them) or no text for any kind; the log says which"
        )
    return settings


def _timer() -> tuple[dict[str, float], Any]:
    seconds: dict[str, float] = {}

    class _Phase:
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            seconds[self.name] = time.perf_counter() - self.start

    return seconds, _Phase


def _check_job(job: SliceJob) -> Any:
    """The checks that need no model: the job's fields, output directory, augmentation, export and path options.

    Returns the parsed ``--calibration-augment``.
    """
    from ..checkpoint.io import check_output_dir
    from .augment import parse_augment

    job.validate()
    check_output_dir(job.output, job.overwrite, inputs=[job.model, job.calibration])
    augment = parse_augment(job.calibration_augment)
    if job.export == "native" and job.config.rotation != "global":
        raise ValueError(
            "--export native writes the family's own architecture, which needs one basis everywhere: "
            "add --rotation global"
        )
    if job.low_memory and (augment.self_samples or job.export == "native"):
        raise ValueError(
            "--low-memory cannot be combined with --calibration-augment self:N (it samples from the whole dense "
            "model) or --export native"
        )
    return augment


def _job_device(job: SliceJob) -> str:
    """Under torchrun / accelerate launch: join the group (each rank calibrates on its share, rank 0 writes)."""
    from ..runtime import distributed

    if distributed.init_from_environment(job.device) and job.device is None:
        return str(distributed.local_device())
    return resolve_device(job.device)


def _check_sources(job: SliceJob) -> None:
    """Fail fast on a bad text source, before the model is loaded; ``datasets`` caches the text for reuse."""
    from .data import load_text, mix_counts

    mix_counts(job.num_samples, job.calibration_mix)
    load_text(
        job.calibration,
        purpose="calibration",
        text_column=job.text_column,
        split=job.split,
        subset=job.subset,
    )
    for source, _ in job.calibration_mix:
        load_text(source, purpose="calibration")
    if job.eval_data:
        load_text(
            job.eval_data,
            purpose="evaluation",
            text_column=job.text_column,
            split=job.eval_split,
            subset=job.subset,
        )


def _load_dense(job: SliceJob) -> tuple[Any, Any, SliceJob]:
    """The dense model and its tokenizer, and the job with ``--export native``'s widths settled.

    The caller's job is not changed: a native export gets a copy whose ``round_to`` the family and llama.cpp can
    run (the default 8 becomes ``lcm(8, heads)``; any other is checked, and refused with the fix).
    """
    from .loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        job.model, dtype=job.dtype, trust_remote_code=job.trust_remote_code
    )
    if tokenizer is None:
        from ..checkpoint.validation import missing_tokenizer_error

        raise missing_tokenizer_error(job.model, "slicing (to read the calibration text)")
    if job.export == "native":  # before any slicing
        from ..checkpoint.export import native_round_to

        asked = None if job.config.round_to == 8 else job.config.round_to
        round_to = native_round_to(model.config, job.config.sparsity, asked)
        job = replace(job, config=replace(job.config, round_to=round_to))
    return model, tokenizer, job


def _evaluation_ids(job: SliceJob, tokenizer: Any, seq_len: int) -> Any:
    """The ``--eval-data`` windows, or ``None``."""
    if not job.eval_data:
        return None
    from .data import evaluation_tokens

    return evaluation_tokens(
        tokenizer,
        job.eval_data,
        seq_len=seq_len,
        max_tokens=job.eval_max_tokens,
        text_column=job.text_column,
        split=job.eval_split,
        subset=job.subset,
    )


def _measured(job: SliceJob, dense_ppl: Any, sliced_ppl: Any) -> dict[str, Any] | None:
    """The report's ``perplexity`` entry: dense and sliced on the same windows."""
    if dense_ppl is None or sliced_ppl is None:
        return None
    return {
        "data": job.eval_data,
        "seq_len": sliced_ppl.seq_len,
        "tokens": sliced_ppl.tokens,
        "dense": dense_ppl.perplexity,
        "sliced": sliced_ppl.perplexity,
        "dense_nll": dense_ppl.nll,
        "sliced_nll": sliced_ppl.nll,
    }


def _native_export(job: SliceJob, sliced: Any, report: dict[str, Any]) -> Any:
    """``--export native``: the family's own model, converted before anything is written (a refusal must leave
    no directory), and recorded in the report; ``None`` for the plugin format."""
    if job.export != "native":
        return None
    from ..checkpoint import report as reporting
    from ..checkpoint.export import to_native

    native = to_native(sliced)
    report["export"] = {
        "format": "native",
        "architecture": type(native).__name__,
        "parameters": reporting.count_parameters(native),
    }
    return native


def _save(job: SliceJob, sliced: Any, native: Any, tokenizer: Any, report: dict[str, Any]) -> Path:
    """Write the checkpoint atomically (rank 0 only): weights, tokenizer, report, plots, card, validation."""
    from ..checkpoint import report as reporting
    from ..checkpoint.io import write_checkpoint
    from ..checkpoint.validation import validate_checkpoint
    from ..runtime import distributed

    def write(directory: Path) -> None:
        (native if native is not None else sliced).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        reporting.write_report(report, directory)
        if job.plots:
            reporting.plot_spectra(sliced.slicing_stats, directory / reporting.PLOTS_DIR)
        if native is not None:
            return  # a plain family checkpoint: transformers' own files, no plugin card or validation
        from ..checkpoint.hub import write_model_card

        write_model_card(directory, name=Path(job.output).name)  # README.md, from the files just written
        # Verify what was written (headers only) before it replaces anything: never publish a broken checkpoint.
        validate_checkpoint(directory)

    output = Path(job.output)
    if distributed.is_main_process():
        output = write_checkpoint(job.output, write, overwrite=job.overwrite)
    return output


def _resumable(job: SliceJob) -> dict[str, Any]:
    """``slice_model``'s arguments for a resumable run (``--checkpoint-every`` / ``--resume``), or none."""
    if not (job.checkpoint_every or job.resume):
        return {}
    from ..runtime.streaming import staging_dir

    return dict(
        checkpoint_dir=staging_dir(job.output), checkpoint_every=job.checkpoint_every, resume=job.resume
    )


def run_slice(job: SliceJob, *, show_progress: bool = True) -> SliceResult:
    """Load, (evaluate,) slice, (evaluate,) and save atomically to ``job.output`` with ``slicing_report.json``.

    Cheap checks (sparsity, output directory, text sources) run before the model is loaded, so a typo fails
    in a second, not after minutes of loading. Nothing is written until slicing succeeded, and the checkpoint
    appears in one rename: a failed run leaves no directory behind.
    """
    import torch

    from ..checkpoint import report as reporting
    from ..runtime import distributed
    from .augment import self_generated_tokens
    from .evaluation import perplexity

    augment = _check_job(job)
    device = _job_device(job)
    if job.low_memory:
        return _run_low_memory(job, device, show_progress)
    resumable = _resumable(job)
    seconds, phase = _timer()
    start = time.perf_counter()
    with phase("check_data"):
        _check_sources(job)
    with phase("load"):
        model, tokenizer, job = _load_dense(job)
    seq_len = capped_seq_len(job.seq_len, model.config, "calibration")
    with phase("tokenize"):
        calibration, broad_kinds = _calibration_windows(job, tokenizer, seq_len, model.config.vocab_size)
        eval_ids = _evaluation_ids(job, tokenizer, seq_len)
    dense_parameters = reporting.count_parameters(model)
    dense_ppl = sliced_ppl = None
    if eval_ids is not None:
        model.to(device)  # evaluation needs the whole model there; slicing alone visits it a layer at a time
        with phase("dense_eval"):  # before slicing: slice_model consumes the dense model
            logger.info("Perplexity of the dense model on %s", job.eval_data)
            dense_ppl = perplexity(
                model, eval_ids, batch_size=job.eval_batch_size, show_progress=show_progress
            )
    if augment.self_samples:
        with phase("augment"):  # sampled from the dense model, so before slice_model consumes it
            extra = self_generated_tokens(
                model, tokenizer, augment.self_samples, seq_len,
                seed=job.seed, batch_size=job.batch_size, show_progress=show_progress,
            )  # fmt: skip
            calibration = torch.cat([calibration, extra.to(calibration.dtype)])
    with phase("slicing"):
        sliced = slice_model(
            model, calibration, job.config, batch_size=job.batch_size, device=device,
            show_progress=show_progress, offload=job.offload, **resumable,
        )  # fmt: skip
        del model
    if eval_ids is not None:
        with phase("sliced_eval"):
            logger.info("Perplexity of the sliced model on %s", job.eval_data)
            sliced_ppl = perplexity(
                sliced, eval_ids, batch_size=job.eval_batch_size, show_progress=show_progress
            )
    seconds["total"] = time.perf_counter() - start
    report = reporting.build_report(
        sliced,
        model=job.model,
        settings=job_settings(job, seq_len, device, broad_kinds),
        dense_parameters=dense_parameters,
        seconds=seconds,
        perplexity=_measured(job, dense_ppl, sliced_ppl),
    )
    native = _native_export(job, sliced, report)
    output = _save(job, sliced, native, tokenizer, report)
    if resumable and distributed.is_main_process():  # the result is safely written: the partial state is done
        shutil.rmtree(resumable["checkpoint_dir"], ignore_errors=True)
    distributed.barrier()
    return SliceResult(model=sliced, tokenizer=tokenizer, report=report, output=output)


def _calibration_windows(
    job: SliceJob, tokenizer: Any, seq_len: int, vocab_size: int
) -> tuple[Any, list[str]]:
    """``job``'s calibration windows, the same on both paths: its source and the mixed-in sources, the built-in
    broad mix, then (with ``swap:F``) a vocabulary-swapped copy of them; and the broad-mix kinds that went in.
    Self-generated text needs the dense model and comes later."""
    import torch

    from .augment import parse_augment, swap_for_tokenizer
    from .broadmix import mix_broad
    from .data import mixed_calibration_tokens

    calibration = mixed_calibration_tokens(
        tokenizer,
        job.calibration,
        job.calibration_mix,
        num_samples=job.num_samples,
        seq_len=seq_len,
        seed=job.seed,
        text_column=job.text_column,
        split=job.split,
        subset=job.subset,
    )
    calibration, broad_kinds = mix_broad(tokenizer, calibration, fraction=job.broad_mix, seed=job.seed)
    fraction = parse_augment(job.calibration_augment).swap_fraction
    if fraction:
        swapped = swap_for_tokenizer(calibration, fraction, tokenizer, vocab_size=vocab_size, seed=job.seed)
        calibration = torch.cat([calibration, swapped])
    return calibration, broad_kinds


def _run_low_memory(job: SliceJob, device: str, show_progress: bool) -> SliceResult:
    """``--low-memory``: stream the blocks from the safetensors shards; never hold the whole model."""
    from transformers import AutoConfig

    from ..checkpoint import report as reporting
    from ..runtime.streaming import resolve_checkpoint, slice_checkpoint
    from .loading import load_tokenizer

    if job.eval_data:
        raise ValueError(
            "--low-memory does not evaluate (that would load the whole dense model); drop --eval-data and run "
            "`hf-slicegpt eval` on the output"
        )
    seconds, phase = _timer()
    start = time.perf_counter()
    source = resolve_checkpoint(job.model)
    tokenizer = load_tokenizer(source, trust_remote_code=job.trust_remote_code)
    config = AutoConfig.from_pretrained(source, trust_remote_code=job.trust_remote_code)
    seq_len = capped_seq_len(job.seq_len, config, "calibration")
    with phase("tokenize"):
        calibration, broad_kinds = _calibration_windows(job, tokenizer, seq_len, config.vocab_size)
    settings = job_settings(job, seq_len, device, broad_kinds)
    result: dict[str, Any] = {}

    def extras(directory: Path, sliced: Any) -> None:
        seconds["slicing"] = time.perf_counter() - slicing_start
        seconds["total"] = time.perf_counter() - start
        result["report"] = reporting.build_report(
            sliced,
            model=job.model,
            settings=settings,
            dense_parameters=reporting.safetensors_parameters(source) or 0,
            seconds=seconds,
        )
        tokenizer.save_pretrained(directory)
        reporting.write_report(result["report"], directory)
        if job.plots:
            reporting.plot_spectra(sliced.slicing_stats, directory / reporting.PLOTS_DIR)
        from ..checkpoint.hub import write_model_card

        write_model_card(directory, name=Path(job.output).name)

    slicing_start = time.perf_counter()
    sliced = slice_checkpoint(
        source,
        calibration,
        job.config,
        job.output,
        overwrite=job.overwrite,
        batch_size=job.batch_size,
        device=device,
        dtype=job.dtype,
        offload=job.offload or "cpu",
        checkpoint_every=job.checkpoint_every,
        resume=job.resume,
        extra_files=extras,
        show_progress=show_progress,
    )
    return SliceResult(
        model=sliced, tokenizer=tokenizer, report=result.get("report", {}), output=Path(job.output)
    )


__all__ = ["SliceJob", "SliceJobError", "SliceResult", "job_settings", "run_slice"]
