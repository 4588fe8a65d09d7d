"""Numerical robustness: SmolLM2-135M sliced at 25% from fp32, bf16 and fp16 weights, side by side.

The PCA is float64 whatever the model dtype (covariances are accumulated in float64 from the model-dtype
signals), so slicing a half-precision model should cost about what slicing the fp32 one costs. Each row loads
the model in its dtype, measures the dense perplexity in that dtype, slices it (the model is consumed), and
measures the sliced perplexity in that dtype and, to separate slicing error from half-precision inference,
again after casting the sliced weights to fp32. Everything is offline: pydocs calibration windows, held-out
pydocs evaluation.

    .venv/bin/python benchmarks/dtype_robustness.py                    # 64 x 512 calibration, fp32/bf16/fp16
    .venv/bin/python benchmarks/dtype_robustness.py --num-samples 8 --seq-len 128 --dtypes float32  # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import torch

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("dtype_robustness")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="model source (default: the offline SmolLM2 GGUF)")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    _, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    calibration = calibration_tokens(
        tokenizer, "pydocs", num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed
    )
    evaluation = evaluation_tokens(tokenizer, "pydocs", seq_len=args.seq_len)
    logger.info("Calibration %s, evaluation %s", tuple(calibration.shape), tuple(evaluation.shape))

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, evaluation, batch_size=args.batch_size, show_progress=False).perplexity

    rows = []
    for dtype in args.dtypes:
        model, _ = load_model_and_tokenizer(args.model, dtype=dtype)
        start = time.perf_counter()
        dense = ppl(model)
        logger.info("%s dense: ppl %.3f (%.0f s)", dtype, dense, time.perf_counter() - start)
        start = time.perf_counter()
        sliced = hf_slicegpt.slice_model(
            model, calibration, args.sparsity, batch_size=args.batch_size, show_progress=False
        )
        slicing_s = time.perf_counter() - start
        sliced_ppl = ppl(sliced)
        sliced_fp32 = sliced_ppl if dtype == "float32" else ppl(sliced.to(torch.float32))
        explained = [s.explained_variance for s in sliced.slicing_stats]
        rows.append(
            {
                "dtype": dtype,
                "dense": dense,
                "sliced": sliced_ppl,
                "sliced_fp32_eval": sliced_fp32,
                "slicing_s": slicing_s,
                "min_explained_variance": min(explained),
            }
        )
        logger.info("%s: %s", dtype, rows[-1])
        del model, sliced

    reference = rows[0]["sliced_fp32_eval"]
    print(
        f"\nSmolLM2-135M at {args.sparsity:.0%} sparsity, calibration pydocs {args.num_samples} x {args.seq_len} "
        f"(seed {args.seed}), evaluation: held-out pydocs, {evaluation.shape[0]} x {args.seq_len} tokens\n"
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n"
    )
    print(
        "| model dtype | dense ppl | sliced ppl (same dtype) | sliced / dense | sliced ppl, fp32 inference "
        f"| vs {rows[0]['dtype']} slice | slicing time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['dtype']} | {row['dense']:.3f} | {row['sliced']:.3f} | {row['sliced'] / row['dense']:.3f} | "
            f"{row['sliced_fp32_eval']:.3f} | {row['sliced_fp32_eval'] / reference:.4f} | {row['slicing_s']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
