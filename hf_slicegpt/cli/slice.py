"""``hf-slicegpt slice MODEL --sparsity S --output DIR``: parse the arguments, run the pipeline, print.

The work is :func:`hf_slicegpt.workflows.pipeline.run_slice` (shared with ``hf-slicegpt demo`` and Python
users). Each option of the algorithm is one row of :data:`SLICE_MODEL_OPTIONS`, whose ``dest`` is the
:class:`~hf_slicegpt.SlicingConfig` field it sets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..slicing import SlicingConfig
from ..workflows.broadmix import BROAD_FRACTION
from ..workflows.pipeline import SliceJob, SliceResult, run_slice
from ._common import (
    add_model_options,
    add_parser,
    add_text_source_options,
    human_bytes,
    positive_int,
    sparsity_fraction,
)

logger = logging.getLogger("hf_slicegpt.cli")

# Options of the algorithm: (flag, argparse keyword arguments). The flag's ``dest`` is the SlicingConfig field
# it sets; a value left at ``None`` is not passed, so the config's own default applies. Exposing a new
# SlicingConfig field on the command line is one row here.
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
        "--correction",
        {
            "choices": ["ridge", "none"],
            "default": None,
            "help": "ridge (default): refit each sliced update's writers to the dense model's output, in closed "
            "form; none: the paper's weights",
        },
    ),
    (
        "--correction-shortcuts",
        {
            "action": "store_true",
            "default": None,
            "help": "with the correction, also refit the per-layer shortcut matrices (off by default: on SmolLM2 "
            "they extrapolated badly to text unlike the calibration)",
        },
    ),
    (
        "--correction-fraction",
        {
            "metavar": "F",
            "type": float,
            "default": None,
            "help": "share of the calibration batches the correction fits on (default: all, up to 65,536 calibration tokens; beyond, every k-th batch so that about that many are fitted)",
        },
    ),
    (
        "--correction-basis",
        {
            "choices": ["sliced", "dense"],
            "default": None,
            "help": "with a correction, each basis is the PCA of the sliced output (default, the paper) or of "
            "the dense output the correction fits",
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


def slicing_config(args: argparse.Namespace) -> SlicingConfig:
    """``--sparsity`` and the :data:`SLICE_MODEL_OPTIONS` that were given, as a validated config."""
    given = {}
    for flag, spec in SLICE_MODEL_OPTIONS:
        value = getattr(args, _option_dest(flag, spec), None)
        if value is not None:
            given[_option_dest(flag, spec)] = value
    return SlicingConfig(sparsity=args.sparsity, **given)


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
        "--sparsity",
        type=sparsity_fraction,
        required=True,
        help="fraction of the hidden size to remove, in [0, 1)",
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
        "--broad-mix",
        metavar="F",
        type=float,
        default=BROAD_FRACTION,
        help=f"replace a share F of the calibration windows per built-in kind of text (Python source, "
        f"structured records, installed packages' READMEs and licences) for robustness to other text "
        f"(default {BROAD_FRACTION:g}; 0: off, the paper)",
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
        output=args.output,
        config=slicing_config(args),
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
        offload=args.offload,
        low_memory=args.low_memory,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        calibration_augment=args.calibration_augment,
        calibration_mix=_mix_pairs(args.calibration_mix or []),
        broad_mix=args.broad_mix,
        export=args.export,
        trust_remote_code=args.trust_remote_code,
    )
    from ..runtime import distributed

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
    "slicing_config",
]
