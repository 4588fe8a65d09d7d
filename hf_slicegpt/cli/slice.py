"""``hf-slicegpt slice MODEL --sparsity S --output DIR``: slice a model and save it with a report.

The pipeline (:func:`run_slice`) is shared with ``hf-slicegpt demo``. Options that ``slice_model`` takes as
keyword arguments are declared once in :data:`SLICE_MODEL_OPTIONS` and passed through untouched.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._common import (
    add_model_options,
    add_parser,
    add_text_source_options,
    capped_seq_len,
    human_bytes,
    positive_int,
    resolve_device,
)

logger = logging.getLogger("hf_slicegpt.cli")

# Options forwarded verbatim to ``hf_slicegpt.slice_model``: (flag, argparse keyword arguments). The keyword
# argument is the flag's ``dest``. A value left at ``None`` is not passed, so slice_model's own default applies.
# Exposing a new slice_model option is one row here.
SLICE_MODEL_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    (
        "--round-to",
        {
            "metavar": "M",
            "type": positive_int,
            "default": None,
            "help": "round each sliced width down to a multiple (default 8)",
        },
    ),
    (
        "--no-slice-head",
        {
            "dest": "slice_head",
            "action": "store_false",
            "default": None,
            "help": "keep the head's input at full width",
        },
    ),
    (
        "--rotation",
        {
            "choices": ["layer", "global"],
            "default": None,
            "help": "layer: a basis per signal (the paper, default); global: one basis, no shortcut matrices, "
            "exportable to the family's own architecture with --export native",
        },
    ),
    (
        "--schedule",
        {
            "choices": ["const", "variance"],
            "default": None,
            "help": "const: one width (default); variance: per-signal widths explaining a common variance "
            "fraction, within the same parameter budget",
        },
    ),
    (
        "--mid-basis",
        {
            "choices": ["auto", "own", "shared"],
            "default": None,
            "help": "basis of each block's MLP input: own (the paper), shared with the block input (one shortcut "
            "fewer), auto (default: shared only where a second shortcut would grow the block and the shared basis "
            "holds the attention output)",
        },
    ),
    (
        "--tied-embeddings",
        {
            "choices": ["auto", "project", "slice", "untie"],
            "default": None,
            "help": "tied vocabulary matrix: project (full width + small projections, exact), slice (sliced once; "
            "RMSNorm families), untie (the reference's layout, larger); auto (default) picks slice for global "
            "rotation of RMSNorm families, project otherwise",
        },
    ),
    (
        "--vocab-prior",
        {
            "type": float,
            "default": None,
            "help": "weight of the vocabulary's own statistics in the first basis (default 0)",
        },
    ),
]


def _option_dest(flag: str, kwargs: dict[str, Any]) -> str:
    return kwargs.get("dest", flag.lstrip("-").replace("-", "_"))


def slice_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`SLICE_MODEL_OPTIONS` that were given, as ``slice_model`` keyword arguments."""
    kwargs = {}
    for flag, spec in SLICE_MODEL_OPTIONS:
        value = getattr(args, _option_dest(flag, spec), None)
        if value is not None:
            kwargs[_option_dest(flag, spec)] = value
    return kwargs


@dataclass
class SliceJob:
    """Everything one slicing run needs; recorded as ``settings`` in the report."""

    model: str
    sparsity: float
    output: str
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
    slice_kwargs: dict[str, Any] = field(default_factory=dict)
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
    # "sliced" (the plugin format) or "native" (the family's own architecture; needs --rotation global).
    export: str = "sliced"


@dataclass
class SliceResult:
    model: Any  # SlicedModelForCausalLM
    tokenizer: Any
    report: dict[str, Any]
    output: Path


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


def run_slice(job: SliceJob, *, show_progress: bool = True) -> SliceResult:
    """Load, (evaluate,) slice, (evaluate,) and save atomically to ``job.output`` with ``slicing_report.json``.

    Cheap checks (sparsity, output directory, text sources) run before the model is loaded, so a typo fails
    in a second, not after minutes of loading. Nothing is written until slicing succeeded, and the checkpoint
    appears in one rename: a failed run leaves no directory behind.
    """
    import torch

    from .. import distributed, slice_model, validate_sparsity
    from .. import report as reporting
    from ..augment import parse_augment, self_generated_tokens
    from ..data import evaluation_tokens, load_text, mix_counts
    from ..evaluation import perplexity
    from ..io import check_output_dir, write_checkpoint
    from ..loading import load_model_and_tokenizer
    from ..streaming import staging_dir
    from ..validation import validate_checkpoint

    sparsity = validate_sparsity(job.sparsity)
    check_output_dir(job.output, job.overwrite)
    augment = parse_augment(job.calibration_augment)
    if job.export not in ("sliced", "native"):
        raise ValueError(f"--export must be 'sliced' or 'native', got {job.export!r}")
    if job.export == "native" and job.slice_kwargs.get("rotation") != "global":
        raise ValueError(
            "--export native writes the family's own architecture, which needs one basis everywhere: "
            "add --rotation global"
        )
    if job.low_memory and (augment.self_samples or job.export == "native"):
        raise ValueError(
            "--low-memory cannot be combined with --calibration-augment self:N (it samples from the whole dense "
            "model) or --export native"
        )
    # Under torchrun / accelerate launch: join the group; each rank calibrates on its share, rank 0 writes.
    if distributed.init_from_environment(job.device) and job.device is None:
        device = str(distributed.local_device())
    else:
        device = resolve_device(job.device)
    if job.low_memory:
        return _run_low_memory(job, sparsity, device, show_progress)
    resumable = {}
    if job.checkpoint_every or job.resume:
        resumable = dict(
            checkpoint_dir=staging_dir(job.output), checkpoint_every=job.checkpoint_every, resume=job.resume
        )
    seconds, phase = _timer()
    start = time.perf_counter()

    with phase("check_data"):  # fail fast on a bad source; the text is cached by `datasets` for reuse
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

    with phase("load"):
        model, tokenizer = load_model_and_tokenizer(job.model, dtype=job.dtype)
        if tokenizer is None:
            from ..validation import missing_tokenizer_error

            raise missing_tokenizer_error(job.model, "slicing (to read the calibration text)")
    if job.export == "native":  # widths the family and llama.cpp can run, before any slicing
        from ..export import native_round_to

        job.slice_kwargs["round_to"] = native_round_to(
            model.config, sparsity, job.slice_kwargs.get("round_to")
        )
    seq_len = capped_seq_len(job.seq_len, model.config, "calibration")

    with phase("tokenize"):
        calibration = _calibration_windows(job, tokenizer, seq_len, model.config.vocab_size)
        eval_ids = None
        if job.eval_data:
            eval_ids = evaluation_tokens(
                tokenizer,
                job.eval_data,
                seq_len=seq_len,
                max_tokens=job.eval_max_tokens,
                text_column=job.text_column,
                split=job.eval_split,
                subset=job.subset,
            )

    if eval_ids is not None:
        # evaluation needs the whole model there; slicing alone visits it one layer at a time
        model.to(device)
    dense_parameters = reporting.count_parameters(model)
    dense_ppl = sliced_ppl = None
    if eval_ids is not None:
        with phase("dense_eval"):  # before slicing: slice_model consumes the dense model
            logger.info("Perplexity of the dense model on %s", job.eval_data)
            dense_ppl = perplexity(
                model, eval_ids, batch_size=job.eval_batch_size, show_progress=show_progress
            )

    if augment.self_samples:
        with phase("augment"):  # sampled from the dense model, so before slice_model consumes it
            extra = self_generated_tokens(
                model,
                tokenizer,
                augment.self_samples,
                seq_len,
                seed=job.seed,
                batch_size=job.batch_size,
                show_progress=show_progress,
            )
            calibration = torch.cat([calibration, extra.to(calibration.dtype)])

    with phase("slicing"):
        sliced = slice_model(
            model,
            calibration,
            sparsity,
            batch_size=job.batch_size,
            device=device,
            show_progress=show_progress,
            offload=job.offload,
            **resumable,
            **job.slice_kwargs,
        )
        del model

    if eval_ids is not None:
        with phase("sliced_eval"):
            logger.info("Perplexity of the sliced model on %s", job.eval_data)
            sliced_ppl = perplexity(
                sliced, eval_ids, batch_size=job.eval_batch_size, show_progress=show_progress
            )
    seconds["total"] = time.perf_counter() - start

    measured = None
    if dense_ppl is not None and sliced_ppl is not None:
        measured = {
            "data": job.eval_data,
            "seq_len": sliced_ppl.seq_len,
            "tokens": sliced_ppl.tokens,
            "dense": dense_ppl.perplexity,
            "sliced": sliced_ppl.perplexity,
            "dense_nll": dense_ppl.nll,
            "sliced_nll": sliced_ppl.nll,
        }
    settings = asdict(job)
    settings.update(seq_len=seq_len, device=str(device), sparsity=sparsity)
    settings.pop("overwrite")
    report = reporting.build_report(
        sliced,
        model=job.model,
        settings=settings,
        dense_parameters=dense_parameters,
        seconds=seconds,
        perplexity=measured,
    )

    native = None
    if job.export == "native":
        from ..export import to_native

        native = to_native(sliced)  # before anything is written: a refusal must leave no directory
        report["export"] = {
            "format": "native",
            "architecture": type(native).__name__,
            "parameters": reporting.count_parameters(native),
        }

    def write(directory: Path) -> None:
        (native if native is not None else sliced).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        reporting.write_report(report, directory)
        if job.plots:
            reporting.plot_spectra(sliced.slicing_stats, directory / reporting.PLOTS_DIR)
        if native is not None:
            return  # a plain family checkpoint: transformers' own files, no plugin card or validation
        from ..hub import write_model_card

        write_model_card(directory, name=Path(job.output).name)  # README.md, from the files just written
        # Verify what was written (headers only) before it replaces anything: never publish a broken checkpoint.
        validate_checkpoint(directory)

    output = Path(job.output)
    if distributed.is_main_process():
        output = write_checkpoint(job.output, write, overwrite=job.overwrite)
        if resumable:  # the result is safely written: the partial state has served its purpose
            shutil.rmtree(resumable["checkpoint_dir"], ignore_errors=True)
    distributed.barrier()
    return SliceResult(model=sliced, tokenizer=tokenizer, report=report, output=output)


def _calibration_windows(job: SliceJob, tokenizer: Any, seq_len: int, vocab_size: int) -> Any:
    """``job``'s calibration windows, the same on both paths: its source and the mixed-in sources, then (with
    ``swap:F``) a vocabulary-swapped copy of them. Self-generated text needs the dense model and comes later."""
    import torch

    from ..augment import parse_augment, swap_for_tokenizer
    from ..data import mixed_calibration_tokens

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
    fraction = parse_augment(job.calibration_augment).swap_fraction
    if fraction:
        swapped = swap_for_tokenizer(calibration, fraction, tokenizer, vocab_size=vocab_size, seed=job.seed)
        calibration = torch.cat([calibration, swapped])
    return calibration


def _run_low_memory(job: SliceJob, sparsity: float, device: str, show_progress: bool) -> SliceResult:
    """``--low-memory``: stream the blocks from the safetensors shards; never hold the whole model."""
    from transformers import AutoConfig, AutoTokenizer

    from .. import report as reporting
    from ..streaming import resolve_checkpoint, slice_checkpoint

    if job.eval_data:
        raise ValueError(
            "--low-memory does not evaluate (that would load the whole dense model); drop --eval-data and run "
            "`hf-slicegpt eval` on the output"
        )
    seconds, phase = _timer()
    start = time.perf_counter()
    source = resolve_checkpoint(job.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    seq_len = capped_seq_len(job.seq_len, config, "calibration")
    with phase("tokenize"):
        calibration = _calibration_windows(job, tokenizer, seq_len, config.vocab_size)
    settings = asdict(job)
    settings.update(seq_len=seq_len, device=str(device), sparsity=sparsity)
    settings.pop("overwrite")
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
        from ..hub import write_model_card

        write_model_card(directory, name=Path(job.output).name)

    slicing_start = time.perf_counter()
    sliced = slice_checkpoint(
        source,
        calibration,
        sparsity,
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
        **job.slice_kwargs,
    )
    return SliceResult(
        model=sliced, tokenizer=tokenizer, report=result.get("report", {}), output=Path(job.output)
    )


def format_summary(report: dict[str, Any], output: Path | str) -> str:
    """The one-screen summary printed after slicing."""
    params = report["parameters"]
    settings = report["settings"]
    slicing = report.get("slicing") or {}
    widths = sorted({row["attn_input_dim"] for row in report["layers"]})
    width_text = ", ".join(map(str, widths)) if len(widths) <= 4 else f"{widths[0]}..{widths[-1]} (per layer)"
    lines = [
        f"Sliced {report['model']} ({report.get('family')}, {len(report['layers'])} layers) at "
        f"{settings['sparsity'] * 100:g}% sparsity in {report['seconds'].get('slicing', 0):.1f} s "
        f"(total {report['seconds'].get('total', 0):.1f} s)",
        f"  calibration    {settings['calibration']}: {settings['num_samples']} x {settings['seq_len']} tokens, "
        f"seed {settings['seed']}",
        *(
            [f"  mixed in       {', '.join(f'{source} ({fraction:g})' for source, fraction in mix)}"]
            if (mix := settings.get("calibration_mix"))
            else []
        ),
        *(
            [f"  augmented      {settings['calibration_augment']}"]
            if settings.get("calibration_augment") not in (None, "", "none")
            else []
        ),
        f"  hidden size    {report['hidden_size']} -> {width_text} (round-to {slicing.get('round_to', '?')})",
        f"  parameters     {params['dense']:,} -> {params['sliced']:,} ({params['sliced_fraction']:.1%} of dense)",
    ]
    ppl = report.get("perplexity")
    if ppl:
        change = ppl["sliced"] / ppl["dense"] - 1
        lines.append(
            f"  perplexity     {ppl['dense']:.3f} -> {ppl['sliced']:.3f} ({change:+.1%}) on {ppl['data']} "
            f"(held-out, {ppl['tokens']:,} tokens, seq-len {ppl['seq_len']})"
        )
    explained = report.get("explained_variance") or {}
    if explained.get("min") is not None:
        lines.append(
            f"  variance kept  min {explained['min']:.1%}, mean {explained['mean']:.1%} "
            f"over {len(report['signals'])} signals"
        )
    memory = report["peak_memory"]
    mem = f"{human_bytes(memory['max_rss_bytes'])} RSS"
    if memory.get("cuda_max_allocated_bytes"):
        mem += f", {human_bytes(memory['cuda_max_allocated_bytes'])} CUDA"
    lines.append(f"  peak memory    {mem}")
    lines.append(f"  saved to       {output} (report: slicing_report.json)")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    parser = add_parser(
        subparsers,
        "slice",
        help="slice a model with SliceGPT and save it",
        description="Slice MODEL (hub id, checkpoint directory, .gguf file or 'smollm2') with SliceGPT and save "
        "the sliced checkpoint, its tokenizer and slicing_report.json to --output.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="hub id, local checkpoint directory, .gguf file, or smollm2"
    )
    parser.add_argument(
        "--sparsity", type=float, required=True, help="fraction of the hidden size to remove, in [0, 1)"
    )
    parser.add_argument("--output", "-o", required=True, help="directory for the sliced checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    data = parser.add_argument_group("calibration data")
    data.add_argument(
        "--calibration",
        default="wikitext2",
        metavar="SOURCE",
        help="wikitext2|ptb|c4|alpaca, pydocs (offline), a hub dataset id, or a local .txt/dir/.jsonl/.json/.parquet",
    )
    data.add_argument(
        "--num-samples", metavar="N", type=positive_int, default=128, help="calibration sequences"
    )
    data.add_argument(
        "--seq-len",
        metavar="L",
        type=positive_int,
        default=2048,
        help="tokens per sequence (capped by the model)",
    )
    data.add_argument("--seed", type=int, default=42, help="picks which calibration windows are used")
    add_text_source_options(
        data, split_help="dataset split to calibrate on (default: the source's train part)"
    )
    evaluation = parser.add_argument_group("evaluation (optional)")
    evaluation.add_argument(
        "--eval-data",
        default=None,
        metavar="SOURCE",
        help="measure perplexity before and after slicing on SOURCE",
    )
    evaluation.add_argument(
        "--eval-split", default=None, help="split of --eval-data (default: its held-out part)"
    )
    evaluation.add_argument(
        "--eval-max-tokens",
        metavar="T",
        type=positive_int,
        default=None,
        help="cap the evaluation tokens, to bound the time",
    )
    evaluation.add_argument(
        "--eval-batch-size",
        metavar="N",
        type=positive_int,
        default=1,
        help="windows per forward pass; each holds N x L x vocab float32 logits, so raise it with care",
    )
    run = parser.add_argument_group("computation")
    run.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=8, help="sequences per forward pass"
    )
    add_model_options(run)
    for flag, spec in SLICE_MODEL_OPTIONS:
        run.add_argument(flag, **spec)
    scale = parser.add_argument_group(
        "performance and scale",
        "Under `torchrun --nproc-per-node N` each process calibrates on its share of the samples and rank 0 "
        "writes (data-parallel; one GPU per process).",
    )
    scale.add_argument(
        "--low-memory",
        action="store_true",
        help="stream the blocks from the safetensors shards and write the result shard by shard: memory is "
        "one block plus the activations, whatever the depth (no --eval-data)",
    )
    scale.add_argument(
        "--offload",
        choices=["cpu", "disk"],
        default=None,
        help="where calibration activations wait between layers: cpu (host RAM) or disk (a memory-mapped "
        "file); default: on --device (host RAM with --low-memory)",
    )
    scale.add_argument(
        "--checkpoint-every",
        metavar="K",
        type=positive_int,
        default=0,
        help="save a resumable state every K layers (in .OUTPUT.partial beside --output)",
    )
    scale.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its saved state; the result is bit-identical",
    )
    parser.add_argument(
        "--plots", action="store_true", help="also write eigenvalue-spectrum PNGs to DIR/plots"
    )
    parser.add_argument(
        "--calibration-mix",
        nargs=2,
        action="append",
        metavar=("SOURCE", "FRACTION"),
        help="draw FRACTION of the calibration windows from SOURCE (repeatable), e.g. --calibration-mix "
        "./legal 0.125: a sliced model keeps the kinds of text its calibration covers",
    )
    parser.add_argument(
        "--calibration-augment",
        metavar="SPEC",
        default=None,
        help="out-of-domain robustness: self:N adds N sequences sampled from the dense model; swap:F adds a "
        "copy of every window with a fraction F of its token types swapped for other vocabulary words; "
        "both: self:N,swap:F",
    )
    parser.add_argument(
        "--export",
        choices=["sliced", "native"],
        default="sliced",
        help="sliced: the plugin format (default); native: the family's own architecture with a smaller "
        "hidden_size, loadable anywhere without hf-slicegpt (needs --rotation global, RMSNorm families)",
    )
    parser.set_defaults(func=run_command)


def _mix_pairs(pairs: list[list[str]]) -> list[tuple[str, float]]:
    """``--calibration-mix SOURCE FRACTION`` pairs, with the fraction read as a number."""
    result = []
    for source, fraction in pairs:
        try:
            result.append((source, float(fraction)))
        except ValueError:
            raise ValueError(
                f"--calibration-mix {source} {fraction!r}: the fraction must be a number in (0, 1), e.g. 0.125"
            ) from None
    return result


def run_command(args: argparse.Namespace) -> int:
    job = SliceJob(
        model=args.model,
        sparsity=args.sparsity,
        output=args.output,
        calibration=args.calibration,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        text_column=args.text_column,
        split=args.split,
        subset=args.subset,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        eval_max_tokens=args.eval_max_tokens,
        eval_batch_size=args.eval_batch_size,
        plots=args.plots,
        overwrite=args.overwrite,
        slice_kwargs=slice_model_kwargs(args),
        offload=args.offload,
        low_memory=args.low_memory,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        calibration_augment=args.calibration_augment,
        calibration_mix=_mix_pairs(args.calibration_mix or []),
        export=args.export,
    )
    from .. import distributed

    try:
        result = run_slice(job, show_progress=not getattr(args, "quiet", False))
        if distributed.is_main_process():
            print(format_summary(result.report, result.output))
    finally:
        distributed.destroy()
    return 0


__all__ = [
    "SLICE_MODEL_OPTIONS",
    "SliceJob",
    "SliceResult",
    "format_summary",
    "run_slice",
    "slice_model_kwargs",
]
