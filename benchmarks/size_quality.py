"""Size and quality of every slicing mode on SmolLM2-135M: parameters and held-out pydocs perplexity.

Rows: per-layer const (the paper), per-layer variance schedule, global rotation (plugin format), and the
global model exported to the family's own LlamaForCausalLM. Columns: sparsities. Also checks the size
targets (never larger than dense from 10%; <= 0.90x per-layer and <= 0.78x global at 25%).

    .venv/bin/python benchmarks/size_quality.py --num-samples 64 --seq-len 512 --out benchmarks/results/size_quality.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import hf_slicegpt
from hf_slicegpt.checkpoint.export import NativeExportError, to_native
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("size_quality")

MODES = {
    "per-layer const": dict(rotation="layer", schedule="const"),
    "per-layer variance": dict(rotation="layer", schedule="variance"),
    "per-layer const, untied (reference layout)": dict(
        rotation="layer", tied_embeddings="untie", mid_basis="own"
    ),
    "global": dict(rotation="global"),
    "global, vocab kept full width": dict(rotation="global", tied_embeddings="project"),
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", default="0.1,0.2,0.25,0.3")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=None, help="cap on held-out tokens (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--counts-only",
        action="store_true",
        help="parameter counts only: widths do not depend on the calibration text, so a little random text "
        "and no perplexity make this fast",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)

    dense, tokenizer = load_model_and_tokenizer(args.model)
    if args.counts_only:
        calib = torch.randint(0, dense.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    else:
        calib = calibration_tokens(
            tokenizer, "pydocs", num_samples=args.num_samples, seq_len=args.seq_len, seed=0
        )
        held_out = evaluation_tokens(
            tokenizer, "pydocs", seq_len=args.eval_seq_len, max_tokens=args.eval_tokens
        )

    def ppl_of(model) -> float:
        if args.counts_only:
            return float("nan")
        return perplexity(model, held_out, batch_size=4, show_progress=False).perplexity

    dense_params = count(dense)
    dense_ppl = ppl_of(dense)
    rows = [{"mode": "dense", "sparsity": 0.0, "params": dense_params, "ratio": 1.0, "ppl": dense_ppl}]
    logger.info("dense: %d params, ppl %.3f", dense_params, dense_ppl)
    del dense

    for mode in args.modes.split(","):
        for sparsity in map(float, args.sparsities.split(",")):
            model, _ = load_model_and_tokenizer(args.model)
            start = time.perf_counter()
            sliced = hf_slicegpt.slice_model(model, calib, sparsity, show_progress=False, **MODES[mode])
            seconds = time.perf_counter() - start
            params = count(sliced)
            ppl = ppl_of(sliced)
            rows.append(
                dict(
                    mode=mode,
                    sparsity=sparsity,
                    params=params,
                    ratio=params / dense_params,
                    ppl=ppl,
                    seconds=seconds,
                )
            )
            logger.info(
                "%s @ %.2f: %d params (%.3fx), ppl %.3f, %.0f s",
                mode,
                sparsity,
                params,
                params / dense_params,
                ppl,
                seconds,
            )
            if mode == "global":
                try:
                    native = to_native(sliced)
                except NativeExportError as error:  # e.g. a width the family's config cannot describe
                    logger.warning("native @ %.2f: %s", sparsity, str(error).splitlines()[0])
                    rows.append(
                        dict(
                            mode="global + native export",
                            sparsity=sparsity,
                            params=0,
                            ratio=float("nan"),
                            ppl=float("nan"),
                            error=str(error).splitlines()[0],
                        )
                    )
                    del sliced, model
                    continue
                native_params = count(native)
                native_ppl = ppl_of(native)
                rows.append(
                    dict(
                        mode="global + native export",
                        sparsity=sparsity,
                        params=native_params,
                        ratio=native_params / dense_params,
                        ppl=native_ppl,
                    )
                )
                logger.info(
                    "native @ %.2f: %d params (%.3fx), ppl %.3f",
                    sparsity,
                    native_params,
                    native_params / dense_params,
                    native_ppl,
                )
            del sliced, model

    print(f"{'mode':45s} {'sparsity':>8s} {'params':>12s} {'vs dense':>9s} {'ppl':>9s}")
    for row in rows:
        print(
            f"{row['mode']:45s} {row['sparsity']:8.2f} {row['params']:12,d} {row['ratio']:9.3f} {row['ppl']:9.3f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
