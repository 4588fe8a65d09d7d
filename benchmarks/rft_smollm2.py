"""RFT benchmark: SmolLM2-135M dense vs sliced 25% vs sliced + recovery fine-tuning, fully offline.

One run, one machine, side by side: the dense model and the sliced model are scored on the held-out pydocs
tail, the sliced model is fine-tuned with LoRA (hf_slicegpt.workflows.rft, paper defaults r=32 alpha=10 dropout 0.05 on
every attention and MLP linear) on the pydocs training part, and scored again (rft measures before/after
itself on the same windows). The merged result is saved and reloaded to check that it loads as a plain sliced
checkpoint with the same logits.

    .venv/bin/python benchmarks/rft_smollm2.py                       # the BENCHMARKS.md "RFT" run (~15 min CPU)
    .venv/bin/python benchmarks/rft_smollm2.py --max-steps 2 --num-samples 8 \\
        --calibration-samples 16 --eval-max-tokens 1024  # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer
from hf_slicegpt.workflows.rft import RFTConfig, rft

logger = logging.getLogger("rft_smollm2")


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied matrix once


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--calibration-samples", type=int, default=128, help="slicing calibration windows")
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512, help="held-out perplexity window")
    parser.add_argument(
        "--eval-max-tokens", type=int, default=None, help="cap the held-out tokens (smoke runs)"
    )
    parser.add_argument("--num-samples", type=int, default=256, help="RFT training windows")
    parser.add_argument("--seq-len", type=int, default=256, help="RFT window length")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--output", default=None, help="keep the merged checkpoint here (default: a temp dir)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    calibration = calibration_tokens(
        tokenizer,
        "pydocs",
        num_samples=args.calibration_samples,
        seq_len=args.calibration_seq_len,
        seed=args.seed,
    )
    evaluation = evaluation_tokens(
        tokenizer, "pydocs", seq_len=args.eval_seq_len, max_tokens=args.eval_max_tokens
    )
    logger.info("Calibration %s, evaluation %s", tuple(calibration.shape), tuple(evaluation.shape))

    start = time.perf_counter()
    dense = perplexity(model, evaluation, batch_size=4, show_progress=False)
    dense_eval_s = time.perf_counter() - start
    dense_params = count_parameters(model)
    logger.info("dense: %s", dense)

    start = time.perf_counter()
    sliced = hf_slicegpt.slice_model(model, calibration, args.sparsity, show_progress=False)
    slicing_s = time.perf_counter() - start
    sliced_params = count_parameters(sliced)
    del model

    config = RFTConfig(
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        logging_steps=10,
        save_steps=max(args.max_steps // 2, 1),
        eval_seq_len=args.eval_seq_len,
        eval_max_tokens=args.eval_max_tokens,
        use_cpu=not torch.cuda.is_available(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output) if args.output else Path(tmp) / "smollm2-sliced25-rft"
        result = rft(
            sliced, tokenizer, "pydocs", out, config, overwrite=bool(args.output), show_progress=False
        )
        probe = evaluation[:1]
        with torch.no_grad():
            expected = result.model(input_ids=probe.to(result.model.device)).logits.cpu()
            reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
            reload_diff = (reloaded(input_ids=probe).logits - expected).abs().max().item()
        files = sorted(p.name for p in out.iterdir())

    report = result.report
    ppl = report["perplexity"]
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "settings": vars(args),
        "eval": {
            "source": "pydocs (held-out tail)",
            "windows": int(evaluation.shape[0]),
            "tokens": dense.tokens,
        },
        "perplexity": {"dense": dense.perplexity, "sliced": ppl["before"], "rft": ppl["after"]},
        "recovered_fraction": (ppl["before"] - ppl["after"]) / (ppl["before"] - dense.perplexity),
        "parameters": {"dense": dense_params, "sliced": sliced_params},
        "lora": {k: report["settings"][k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")},
        "training": {k: v for k, v in report["training"].items() if k != "log"},
        "loss_log": report["training"]["log"],
        "seconds": {
            "dense_eval": round(dense_eval_s, 1),
            "slicing": round(slicing_s, 1),
            "rft_train": report["training"]["runtime_s"],
            "total": round(time.perf_counter() - wall, 1),
        },
        "merged_reload_max_logit_diff": reload_diff,
        "output_files": files,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    p = results["perplexity"]
    print(
        f"\n| model | parameters | held-out ppl (pydocs, seq {args.eval_seq_len}) |\n|---|---|---|\n"
        f"| dense | {dense_params:,} | {p['dense']:.3f} |\n"
        f"| sliced {args.sparsity:.0%} | {sliced_params:,} | {p['sliced']:.3f} |\n"
        f"| sliced {args.sparsity:.0%} + RFT ({report['training']['global_step']} steps, "
        f"{report['training']['runtime_s'] / 60:.1f} min) | {sliced_params:,} | {p['rft']:.3f} |"
    )


if __name__ == "__main__":
    main()
