"""Per-window held-out perplexity of SmolLM2 at 25% for several calibration seeds (issue 17 diagnostic).

Each spec is ``SEED:CORRECTION:FRACTION[:shortcuts]`` (``FRACTION`` ``auto`` = the default fit rule;
``shortcuts`` refits the shortcut matrices too, ``correction_shortcuts=True``); 128 x 512 pydocs windows. Every
window of the held-out pydocs tail is scored on its own, and with ``--dev`` also every window of the calibration
part that the spec's draw did not use (text of the calibration's kind that neither calibrated nor is reported
as the held-out figure). Results in ``--out`` (JSON, mean NLL per window).

    .venv/bin/python benchmarks/diagnostics/correction_seeds.py 42:ridge:auto 42:ridge:auto:shortcuts \\
        42:none:1 --dev --out benchmarks/results/correction_seeds_shortcuts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch

import hf_slicegpt
from hf_slicegpt.workflows.data import (
    calibration_tokens,
    evaluation_tokens,
    load_text,
    tokenize_text,
    windows,
)
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("correction_seeds")


@torch.no_grad()
def window_nll(model, rows: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each window on its own."""
    out = []
    for row in rows:
        logits = model(row[None]).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, row[1:]).item())
    return out


def unused_windows(tokenizer, drawn: torch.Tensor) -> torch.Tensor:
    """The calibration part's 512-token windows that ``drawn`` does not contain."""
    grid = windows(tokenize_text(tokenizer, load_text("pydocs", purpose="calibration")), 512, None, None)
    used = {tuple(row.tolist()) for row in drawn}
    return torch.stack([row for row in grid if tuple(row.tolist()) not in used])


def relative(nll: list[float], dense: list[float]) -> float:
    return float(torch.tensor(sum(nll) / len(nll) - sum(dense) / len(dense)).exp())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dev", action="store_true", help="also score the calibration windows not drawn")
    parser.add_argument("--out", default="correction_seeds.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_model_and_tokenizer("smollm2")
    dense.eval()
    held_out = evaluation_tokens(tokenizer, "pydocs", seq_len=512)
    results: dict = {"eval": {"dense": window_nll(dense, held_out)}, "dev": {}}
    for spec in args.specs:
        seed, correction, fraction, *extra = spec.split(":")
        calibration = calibration_tokens(tokenizer, "pydocs", num_samples=128, seq_len=512, seed=int(seed))
        start = time.perf_counter()
        sliced = hf_slicegpt.slice_model(
            copy.deepcopy(dense),
            calibration,
            0.25,
            correction=correction,
            correction_fraction=None if fraction == "auto" else float(fraction),
            correction_shortcuts=extra == ["shortcuts"],
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        results["eval"][spec] = window_nll(sliced, held_out)
        line = f"held-out tail {relative(results['eval'][spec], results['eval']['dense']):.3f}x"
        if args.dev:
            dev = unused_windows(tokenizer, calibration)
            results["dev"].setdefault(f"{seed}:dense", window_nll(dense, dev))
            results["dev"][spec] = window_nll(sliced, dev)
            line += f", {len(dev)} unused windows {relative(results['dev'][spec], results['dev'][f'{seed}:dense']):.3f}x"
        logger.info("%s: %.0f s; perplexity %s dense", spec, seconds, line)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
