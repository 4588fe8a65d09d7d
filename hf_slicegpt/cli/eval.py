"""``hf-slicegpt eval MODEL [MODEL ...] --data SOURCE``: perplexity of dense and sliced checkpoints alike.

With several models (say, one checkpoint per sparsity) ``--plot FILE`` draws perplexity against the sparsity
each one's config records (0 for a dense model): the picture for choosing a sparsity.

``--tasks piqa,winogrande,...`` adds zero-shot accuracy through lm-eval (:mod:`hf_slicegpt.workflows.zeroshot`), with or
without ``--data``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from typing import Any

from ..modeling.configuration_sliced import SlicedConfig
from ..workflows.loading import capped_seq_len, resolve_device
from ._common import (
    add_model_options,
    add_parser,
    add_text_source_options,
    human_count,
    positive_int,
)

logger = logging.getLogger("hf_slicegpt.cli")


def model_sparsity(config: Any) -> float:
    """The sparsity a checkpoint was sliced at (``0.0`` for a dense model)."""
    slicing = getattr(config, "slicing", None) or {}
    return float(slicing.get("sparsity", 0.0))


def evaluate_model(
    source: str,
    *,
    data: str,
    seq_len: int = 2048,
    max_tokens: int | None = None,
    batch_size: int = 1,
    dtype: str | None = None,
    device: str | None = None,
    text_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Perplexity of the model at ``source`` on the evaluation text of ``data``, as a JSON-ready dict."""
    from ..checkpoint.report import count_parameters
    from ..workflows.data import evaluation_tokens
    from ..workflows.evaluation import perplexity
    from ..workflows.loading import load_model_and_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        source, dtype=dtype, device=resolve_device(device), trust_remote_code=trust_remote_code
    )
    if tokenizer is None:
        from ..checkpoint.validation import missing_tokenizer_error

        raise missing_tokenizer_error(source, f"evaluation (to read {data!r})")
    length = capped_seq_len(seq_len, model.config, "evaluation")
    ids = evaluation_tokens(
        tokenizer,
        data,
        seq_len=length,
        max_tokens=max_tokens,
        text_column=text_column,
        split=split,
        subset=subset,
    )
    result = perplexity(model, ids, batch_size=batch_size, show_progress=show_progress)
    row = {
        "model": source,
        "data": data,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "seq_len": result.seq_len,
        "windows": int(ids.shape[0]),
        "sparsity": model_sparsity(model.config),
        "sliced": getattr(model.config, "model_type", None) == SlicedConfig.model_type,
        "parameters": count_parameters(model),
        "seconds": round(time.perf_counter() - start, 3),
    }
    del model
    gc.collect()
    return row


def register(subparsers: Any) -> None:
    parser = add_parser(
        subparsers,
        "eval",
        help="perplexity of one or more models on a text source",
        description="Perplexity (exp of the mean token NLL over non-overlapping windows) of each MODEL on the "
        "evaluation part of SOURCE. Works on dense and sliced checkpoints alike.",
    )
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="hub id, checkpoint directory, .gguf or smollm2"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="SOURCE",
        help="perplexity text (optional with --tasks): wikitext2|ptb|c4|alpaca, pydocs (offline), a hub dataset "
        "id, or a local .txt/dir/.jsonl/.json/.parquet",
    )
    parser.add_argument(
        "--seq-len", metavar="L", type=positive_int, default=2048, help="window length (capped by the model)"
    )
    parser.add_argument(
        "--max-tokens", metavar="T", type=positive_int, default=None, help="cap the tokens evaluated"
    )
    parser.add_argument(
        "--batch-size",
        metavar="N",
        type=positive_int,
        default=1,
        help="windows per forward pass; each holds L x vocab float32 logits (raise it on a GPU)",
    )
    add_text_source_options(parser, split_help="split to evaluate on (default: the source's held-out part)")
    add_model_options(parser)
    parser.add_argument(
        "--json", action="store_true", help="print JSON (an object; a list for several models)"
    )
    parser.add_argument("--plot", metavar="FILE", default=None, help="write a PNG of perplexity vs sparsity")
    add_zero_shot_options(parser)
    parser.set_defaults(func=run_command)


def add_zero_shot_options(parser: argparse.ArgumentParser) -> None:
    """``--tasks`` and friends: zero-shot accuracy with lm-eval (hf_slicegpt.workflows.zeroshot)."""
    group = parser.add_argument_group("zero-shot accuracy (lm-eval)")
    group.add_argument(
        "--tasks",
        default=None,
        metavar="TASKS",
        help="comma-separated lm-eval tasks, e.g. piqa,winogrande,hellaswag,arc_easy,arc_challenge ('paper')",
    )
    group.add_argument("--num-fewshot", type=int, default=0, help="examples in context (the paper: 0)")
    group.add_argument("--limit", type=float, default=None, help="examples per task, for quick checks")
    group.add_argument("--include-path", default=None, help="a directory of local lm-eval task YAMLs")
    group.add_argument(
        "--save-results", action="store_true", help="write zeroshot_results.json into each MODEL directory"
    )


def zero_shot_rows(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``--tasks`` on every model; each result goes into its row (``"zero_shot"``) and is printed."""
    from ..workflows.zeroshot import evaluate_checkpoint, format_table

    by_model = {row["model"]: row for row in rows}
    for source in args.models:
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        result = evaluate_checkpoint(
            source,
            args.tasks,
            dtype=args.dtype,
            device=args.device,
            save=args.save_results,
            num_fewshot=args.num_fewshot,
            limit=limit,
            batch_size=args.batch_size,
            include_path=args.include_path,
            trust_remote_code=args.trust_remote_code,
        )
        row = by_model.setdefault(source, {"model": source})
        row["zero_shot"] = result
        if not args.json:
            print(f"{source}: zero-shot, lm-eval {result['lm_eval_version']}, {args.num_fewshot}-shot")
            print(format_table(result), flush=True)
    return list(by_model.values())


def run_command(args: argparse.Namespace) -> int:
    if not args.data and not args.tasks:
        raise ValueError(
            "nothing to evaluate: pass --data SOURCE (perplexity), --tasks LIST (zero-shot), or both"
        )
    if args.plot and not args.data:
        raise ValueError("--plot draws perplexity: it needs --data SOURCE")
    # Fail before minutes of evaluation, not after: a plot file that cannot be written, lm-eval missing.
    if args.plot:
        from ..checkpoint.report import check_plot_file

        check_plot_file(args.plot)
    if args.tasks:
        from ..workflows.zeroshot import require_lm_eval

        require_lm_eval()
    rows = []
    for source in args.models if args.data else ():
        row = evaluate_model(
            source,
            data=args.data,
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            text_column=args.text_column,
            split=args.split,
            subset=args.subset,
            show_progress=not getattr(args, "quiet", False),
            trust_remote_code=args.trust_remote_code,
        )
        rows.append(row)
        if not args.json:
            print(
                f"{row['model']}: perplexity {row['perplexity']:.4f} on {row['data']} "
                f"({row['tokens']:,} tokens, seq-len {row['seq_len']}; sparsity {row['sparsity'] * 100:g}%, "
                f"{human_count(row['parameters'])} parameters)",
                flush=True,
            )
    if args.tasks:
        rows = zero_shot_rows(args, rows)
    if args.json:  # before the plot: the figures are printed even if writing the picture fails
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2), flush=True)
    if args.plot:
        from ..checkpoint.report import PerplexityPoint, plot_perplexity_vs_sparsity

        points = [PerplexityPoint(r["model"], r["sparsity"], r["perplexity"]) for r in rows]
        path = plot_perplexity_vs_sparsity(points, args.plot, data=args.data)
        logger.info("Wrote %s", path)
    return 0
