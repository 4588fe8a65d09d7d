"""Core benchmark: SmolLM2-135M dense vs SliceGPT at several sparsities, fully offline.

For each sparsity the dense model is reloaded (``slice_model`` consumes its input), sliced on pydocs calibration
windows, and scored on the held-out pydocs tail. All rows come from one run on one machine, side by side.
The rows are the paper's method (``--correction none``, the default here); ``--correction ridge`` gives the
library default's.

    .venv/bin/python benchmarks/core_smollm2.py            # 128 x 512 calibration, 20/25/30%
    .venv/bin/python benchmarks/core_smollm2.py --num-samples 16 --seq-len 128 --sparsities 0.25  # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from pathlib import Path

import torch

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("core_smollm2")
# The code these numbers depend on; uncommitted changes there mark the revision "+dirty".
CORE_FILES = [
    f"hf_slicegpt/{name}"
    for name in (
        "slicing.py",
        "pca.py",
        "invariance.py",
        "modeling",
        "adapters",
        "data.py",
        "evaluation.py",
        "loading.py",
    )
]


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def git_revision() -> str:
    """The commit the numbers were measured at (``+dirty`` with uncommitted core changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", *CORE_FILES], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="model source (default: the offline SmolLM2 GGUF)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.20, 0.25, 0.30])
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--correction", choices=["none", "ridge"], default="none",
        help="none: the paper's weights (default); ridge: the library default's output-aware correction",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    revision = git_revision()
    logger.info(
        "hf_slicegpt at %s, torch %s, %d threads", revision, torch.__version__, torch.get_num_threads()
    )
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    calibration = calibration_tokens(
        tokenizer, "pydocs", num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed
    )
    evaluation = evaluation_tokens(tokenizer, "pydocs", seq_len=args.seq_len)
    logger.info("Calibration %s, evaluation %s", tuple(calibration.shape), tuple(evaluation.shape))

    dense_params = count_parameters(model)
    start = time.perf_counter()
    dense_ppl = perplexity(model, evaluation, batch_size=args.eval_batch_size, show_progress=False).perplexity
    rows = [
        {
            "sparsity": 0.0,
            "perplexity": dense_ppl,
            "parameters": dense_params,
            "param_ratio": 1.0,
            "slicing_s": None,
            "eval_s": time.perf_counter() - start,
            "hidden": model.config.hidden_size,
        }
    ]
    logger.info("dense: ppl %.3f, %d parameters", dense_ppl, dense_params)
    del model

    for sparsity in args.sparsities:
        model, _ = load_model_and_tokenizer(args.model, dtype="float32")
        start = time.perf_counter()
        config = hf_slicegpt.SlicingConfig(sparsity=sparsity, correction=args.correction)
        sliced = hf_slicegpt.slice_model(
            model, calibration, config, batch_size=args.batch_size, show_progress=False
        )
        slicing_s = time.perf_counter() - start
        start = time.perf_counter()
        ppl = perplexity(sliced, evaluation, batch_size=args.eval_batch_size, show_progress=False).perplexity
        params = count_parameters(sliced)
        rows.append(
            {
                "sparsity": sparsity,
                "perplexity": ppl,
                "parameters": params,
                "param_ratio": params / dense_params,
                "slicing_s": slicing_s,
                "eval_s": time.perf_counter() - start,
                "hidden": sliced.config.attn_input_dims[0],
            }
        )
        logger.info(
            "%.0f%%: ppl %.3f, %d parameters, sliced in %.0f s", sparsity * 100, ppl, params, slicing_s
        )
        del sliced, model

    print(
        f"\nSmolLM2-135M (fp32), correction {args.correction}, calibration pydocs {args.num_samples} x {args.seq_len} "
        f"(seed {args.seed}), "
        f"evaluation: held-out pydocs, {evaluation.shape[0]} x {args.seq_len} tokens\n"
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"hf_slicegpt {revision}\n"
    )
    print(
        "| sparsity | hidden | held-out ppl | ppl / dense | parameters | params / dense | slicing time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        slicing = "-" if row["slicing_s"] is None else f"{row['slicing_s']:.0f}"
        name = "dense" if row["sparsity"] == 0 else f"{row['sparsity']:.0%}"
        print(
            f"| {name} | {row['hidden']} | {row['perplexity']:.2f} | {row['perplexity'] / dense_ppl:.3f} | "
            f"{row['parameters'] / 1e6:.2f} M | {row['param_ratio']:.3f} | {slicing} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "revision": revision, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
