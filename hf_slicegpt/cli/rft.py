"""``hf-slicegpt rft SLICED --data SOURCE --output DIR``: recovery fine-tuning of a sliced model with LoRA.

Defaults follow the SliceGPT paper (r=32, alpha=10, dropout 0.05 on every attention and MLP linear, sequences of
1024 tokens). ``--merge`` (default) writes a plain sliced checkpoint; ``--no-merge`` a PEFT adapter. Trainer
checkpoints go to ``DIR.rft-checkpoints`` (``--checkpoint-dir``); ``--resume`` continues an interrupted run.

Multi-GPU data parallel is Trainer's: ``torchrun --nproc-per-node N -m hf_slicegpt.cli rft ...`` or
``accelerate launch -m hf_slicegpt.cli rft ...``. ``--batch-size`` is per device.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from ..workflows.loading import capped_seq_len
from ._common import add_model_options, add_parser, add_text_source_options, positive_int

logger = logging.getLogger("hf_slicegpt.cli")

# The library's defaults (hf_slicegpt.workflows.rft.RFTConfig), repeated here so that `--help` needs no torch import;
# tests/test_rft.py checks that they agree.
DEFAULTS: dict[str, Any] = {
    "r": 32,
    "lora_alpha": 10.0,
    "lora_dropout": 0.05,
    "num_samples": 1024,
    "seq_len": 1024,
    "epochs": 1.0,
    "learning_rate": 2e-4,
    "lr_scheduler": "linear",
    "warmup_steps": 0,
    "batch_size": 1,
    "grad_accum": 1,
    "seed": 42,
    "logging_steps": 10,
    "save_steps": 100,
    "save_total_limit": 2,
    "eval_batch_size": 4,
}


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
    return names


def _fraction_or_steps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of steps or a ratio in [0, 1), got {text!r}"
        ) from None
    if value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"expected a whole number of steps or a ratio in [0, 1), got {text!r}"
        )
    return value


def register(subparsers: Any) -> None:
    parser = add_parser(
        subparsers,
        "rft",
        help="recover a sliced model's quality with LoRA fine-tuning",
        description="Recovery fine-tuning: LoRA (PEFT) on the sliced model SLICED, trained by transformers.Trainer "
        "on the training part of SOURCE, with perplexity on its held-out part before and after. Writes a merged "
        "sliced checkpoint (default) or a PEFT adapter, rft_report.json and a model card to --output. "
        "Multi-GPU: run under `torchrun --nproc-per-node N -m hf_slicegpt.cli rft ...` or `accelerate launch`.",
    )
    parser.add_argument("model", metavar="SLICED", help="sliced checkpoint directory (or hub id)")
    parser.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="training text: wikitext2|ptb|c4|alpaca, pydocs (offline), a hub dataset id, or a local file/dir",
    )
    parser.add_argument("--output", "-o", required=True, help="directory for the result")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output and discard stale checkpoints"
    )
    parser.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge LoRA into the weights (a plain sliced checkpoint); --no-merge saves a PEFT adapter",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")

    train = parser.add_argument_group("training")
    train.add_argument(
        "--num-samples", type=positive_int, default=DEFAULTS["num_samples"], help="training sequences"
    )
    train.add_argument(
        "--seq-len",
        type=positive_int,
        default=DEFAULTS["seq_len"],
        help="tokens per sequence (capped by the model)",
    )
    steps = train.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, default=DEFAULTS["epochs"], help="passes over the sequences")
    steps.add_argument(
        "--max-steps", type=positive_int, default=None, help="optimizer steps (instead of --epochs)"
    )
    train.add_argument("--lr", type=float, default=DEFAULTS["learning_rate"], help="peak learning rate")
    train.add_argument("--lr-scheduler", default=DEFAULTS["lr_scheduler"], help="transformers scheduler type")
    train.add_argument(
        "--warmup-steps",
        type=_fraction_or_steps,
        default=DEFAULTS["warmup_steps"],
        help="steps, or a ratio < 1",
    )
    train.add_argument(
        "--batch-size", type=positive_int, default=DEFAULTS["batch_size"], help="sequences per device"
    )
    train.add_argument(
        "--grad-accum", type=positive_int, default=DEFAULTS["grad_accum"], help="accumulation steps"
    )
    train.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations to save memory"
    )
    train.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    train.add_argument(
        "--seed", type=int, default=DEFAULTS["seed"], help="picks the windows; seeds LoRA and Trainer"
    )
    train.add_argument(
        "--logging-steps", type=positive_int, default=DEFAULTS["logging_steps"], help="log every N steps"
    )
    add_text_source_options(train, split_help="split to train on (default: the source's training part)")
    add_model_options(train)

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=positive_int, default=DEFAULTS["r"], help="rank")
    lora.add_argument(
        "--lora-alpha", type=float, default=DEFAULTS["lora_alpha"], help="scale numerator (alpha / r)"
    )
    lora.add_argument(
        "--lora-dropout", type=float, default=DEFAULTS["lora_dropout"], help="dropout on LoRA inputs"
    )
    lora.add_argument(
        "--target-modules",
        type=_names,
        default=None,
        help="comma-separated module names (default: every attention and MLP linear)",
    )
    lora.add_argument(
        "--target-shortcuts", action="store_true", help="also adapt the shortcut matrices slicing added"
    )

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--checkpoint-dir", default=None, help="Trainer checkpoints (default: OUTPUT.rft-checkpoints)"
    )
    ckpt.add_argument(
        "--save-steps", type=positive_int, default=DEFAULTS["save_steps"], help="checkpoint every N steps"
    )
    ckpt.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    ckpt.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after success")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval-data",
        default=None,
        metavar="SOURCE",
        help="perplexity text (default: the held-out part of --data)",
    )
    evaluation.add_argument(
        "--eval-seq-len", type=positive_int, default=None, help="window (default: --seq-len)"
    )
    evaluation.add_argument(
        "--eval-max-tokens", type=positive_int, default=None, help="cap the evaluation tokens"
    )
    evaluation.add_argument("--no-eval", action="store_true", help="skip perplexity before and after")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from ..checkpoint.io import check_output_dir
    from ..workflows.loading import load_model_and_tokenizer
    from ..workflows.rft import RFTConfig, rft

    check_output_dir(args.output, args.overwrite, inputs=[args.model, args.data])  # before minutes of loading
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    if tokenizer is None:
        from ..checkpoint.validation import missing_tokenizer_error

        raise missing_tokenizer_error(args.model, f"RFT (to read {args.data!r})")
    seq_len = capped_seq_len(args.seq_len, model.config, "training")
    eval_seq_len = (
        capped_seq_len(args.eval_seq_len, model.config, "evaluation") if args.eval_seq_len else None
    )
    if args.device not in (None, "cpu", "cuda"):
        logger.info(
            "Trainer places the model itself (cuda when visible); --device %s is ignored", args.device
        )
    config = RFTConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        target_shortcuts=args.target_shortcuts,
        num_samples=args.num_samples,
        seq_len=seq_len,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=int(args.warmup_steps) if args.warmup_steps >= 1 else args.warmup_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        merge=args.merge,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        eval_seq_len=eval_seq_len,
        eval_max_tokens=args.eval_max_tokens,
        use_cpu=args.device == "cpu",
    )
    result = rft(
        model,
        tokenizer,
        args.data,
        args.output,
        config,
        eval_data=args.eval_data,
        evaluate=not args.no_eval,
        text_column=args.text_column,
        split=args.split,
        subset=args.subset,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        overwrite=args.overwrite,
        base_model_path=args.model,
        show_progress=not getattr(args, "quiet", False),
    )
    if result.output_dir is None:  # a non-zero rank under torchrun: the main process reports
        return 0
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print(format_summary(result.report, result.output_dir))
    return 0


def format_summary(report: dict[str, Any], output: Any) -> str:
    """The few lines printed after RFT."""
    training, settings = report["training"], report["settings"]
    targets = settings["target_modules"]
    lines = [
        f"RFT of {report['model']}: {training['global_step']} steps on {training['sequences']} x {training['seq_len']} "
        f"tokens of {report['data']['train']} in {training['runtime_s']:.1f} s (final loss {training['train_loss']:.4f})",
        f"  LoRA           r={settings['r']} alpha={settings['lora_alpha']:g} dropout={settings['lora_dropout']:g} on "
        + (", ".join(targets) if isinstance(targets, list) else str(targets))
        + f" ({report['parameters']['trainable']:,} trainable)",
    ]
    ppl = report.get("perplexity")
    if ppl:
        change = ppl["after"] / ppl["before"] - 1
        lines.append(
            f"  perplexity     {ppl['before']:.3f} -> {ppl['after']:.3f} ({change:+.1%}) on {ppl['data']} "
            f"(held-out, {ppl['tokens']:,} tokens, seq-len {ppl['seq_len']})"
        )
    kind = "merged sliced checkpoint" if report["merged"] else "PEFT adapter"
    lines.append(f"  saved to       {output} ({kind}; report: rft_report.json)")
    return "\n".join(lines)


__all__ = ["DEFAULTS", "format_summary", "register", "run_command"]
