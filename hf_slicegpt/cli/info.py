"""``hf-slicegpt info DIR``: what a sliced checkpoint is, read from its config and report (no weights loaded)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import add_parser


def format_info(summary: dict[str, Any]) -> str:
    """Human-readable settings, parameter counts and per-layer widths of a sliced checkpoint."""
    slicing = summary["slicing"]
    params = summary["parameters"]
    lines = [f"Sliced checkpoint {summary['path']}"]
    lines.append(
        f"  family          {summary['family']} ({summary['topology']} blocks, {summary['num_layers']} layers)"
        + (", tied embeddings kept tied" if summary["tied_embeddings"] else "")
    )
    sparsity = slicing.get("sparsity")
    if sparsity is not None:
        achieved = slicing.get("achieved_sparsity")
        done = f", {achieved * 100:.4g}% achieved" if achieved is not None else ""
        lines.append(
            f"  sparsity        {sparsity * 100:g}%{done} (round-to {slicing.get('round_to')}, rotation "
            f"{slicing.get('rotation')}, schedule {slicing.get('schedule')})"
        )
    calib = summary.get("settings") or {}
    if slicing.get("calibration_sequences") is not None:
        source = f"{calib['calibration']}: " if calib.get("calibration") else ""
        lines.append(
            f"  calibration     {source}{slicing['calibration_sequences']} sequences, "
            f"{slicing.get('calibration_tokens', 0):,} tokens"
        )
    lines.append(
        f"  hidden size     {summary['hidden_size']} -> embedding {summary['embedding_dim']}, "
        f"head input {summary['head_input_dim']}"
    )
    if params.get("sliced") is not None:
        text = f"  parameters      {params['sliced']:,}"
        if params.get("dense"):
            text = (
                f"  parameters      {params['dense']:,} dense -> {params['sliced']:,} sliced "
                f"({params['sliced_fraction']:.1%})"
            )
        lines.append(text)
    ppl = summary.get("perplexity")
    if ppl:
        lines.append(
            f"  perplexity      {ppl['dense']:.3f} dense -> {ppl['sliced']:.3f} sliced on {ppl['data']} "
            f"(seq-len {ppl['seq_len']}, {ppl['tokens']:,} tokens)"
        )
    explained = summary.get("explained_variance") or {}
    if explained.get("min") is not None:
        lines.append(f"  variance kept   min {explained['min']:.1%}, mean {explained['mean']:.1%}")
    sequential = any(row["mlp_input_dim"] is not None for row in summary["layers"])
    lines.append("  layer  attn_in" + ("  mlp_in" if sequential else "") + "     out")
    for row in summary["layers"]:
        mlp = f"  {row['mlp_input_dim']:>6}" if sequential else ""
        lines.append(f"  {row['layer']:>5}  {row['attn_input_dim']:>7}{mlp}  {row['output_dim']:>6}")
    lines += [f"warning: {warning}" for warning in summary.get("warnings") or ()]
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    parser = add_parser(
        subparsers,
        "info",
        help="show a sliced checkpoint's settings, per-layer widths and parameter counts",
    )
    parser.add_argument("directory", metavar="DIR", help="a sliced checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from ..checkpoint.report import checkpoint_summary
    from ..checkpoint.validation import validate_checkpoint

    # Metadata only: a damaged or inconsistent checkpoint is one clear error, foreign remote code a warning.
    check = validate_checkpoint(args.directory)
    summary = checkpoint_summary(args.directory)
    summary["warnings"] = check.warnings  # e.g. an auto_map (config or tokenizer) that is not hf-slicegpt's
    print(json.dumps(summary, indent=2) if args.json else format_info(summary))
    return 0
