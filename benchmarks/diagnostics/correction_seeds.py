"""Per-window held-out perplexity of SmolLM2 at 25% for several calibration seeds (issue 17 diagnostic).

Each spec is ``SEED:CORRECTION:FRACTION`` (``FRACTION`` ``auto`` = the default fit rule); 128 x 512 pydocs
windows, every window of the held-out pydocs tail scored separately, results in ``--out`` (JSON, NLL per window).

    .venv/bin/python benchmarks/diagnostics/correction_seeds.py 42:ridge:auto 0:ridge:auto 42:none:1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("correction_seeds")


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each window on its own."""
    out = []
    for row in windows:
        logits = model(row[None]).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, row[1:]).item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="correction_seeds.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_model_and_tokenizer("smollm2")
    dense.eval()
    windows = evaluation_tokens(tokenizer, "pydocs", seq_len=512)
    results = {"dense": window_nll(dense, windows)}
    for spec in args.specs:
        seed, correction, fraction = spec.split(":")
        calibration = calibration_tokens(tokenizer, "pydocs", num_samples=128, seq_len=512, seed=int(seed))
        start = time.perf_counter()
        sliced = hf_slicegpt.slice_model(
            copy.deepcopy(dense),
            calibration,
            0.25,
            correction=correction,
            correction_fraction=None if fraction == "auto" else float(fraction),
            show_progress=False,
        )
        results[spec] = window_nll(sliced, windows)
        mean = sum(results[spec]) / len(windows) - sum(results["dense"]) / len(windows)
        logger.info(
            "%s: %.0f s; perplexity %.3fx dense",
            spec,
            time.perf_counter() - start,
            float(torch.tensor(mean).exp()),
        )
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
