"""One-token products (decode's GEMVs) in the two weight layouts, at SmolLM2's dense and sliced shapes (CPU).

``nn.Linear`` stores a weight as ``[out, in]`` and computes ``x W^T``: each output is a dot product of a weight row
with ``x``. The fused groups of a sliced model store ``[in, out]`` and compute ``x @ W_t``: a sum of contiguous
weight rows scaled by the entries of ``x``. This script measures how fast each form streams weights that are not
in cache (as in decode, where every weight is read once per token): for each shape it holds enough distinct
matrices to fill ``--pass-mb`` megabytes (far more than the last-level cache) and times one pass over all of
them, alternating the two layouts for ``--repeats`` rounds. It reports the median time per product, the spread, and GB/s of weights read.

With ``--tokens 4096`` it also times an 8 x 512 prefill's GEMMs (compute-bound; two matrices per shape).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gemv_layout.py --tokens 1 4096 \\
        --json benchmarks/results/gemv_layout.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time

import torch

logger = logging.getLogger("gemv_layout")

# (label, out, in): dense SmolLM2 readers and writers, and the sliced model's fused groups and writers at 25%.
SHAPES = [
    ("dense q/o_proj", 576, 576),
    ("dense gate/up_proj", 1536, 576),
    ("dense down_proj", 576, 1536),
    ("sliced 25% fused q/k/v + shortcut", 1392, 432),
    ("sliced 25% fused gate/up + shortcut", 3504, 432),
    ("sliced 25% down_proj", 432, 1536),
    ("native 25% gate/up_proj", 1536, 432),
    ("dense lm_head (tied)", 49152, 576),
    ("native 25% lm_head (tied)", 49152, 432),
]


def one_pass(products) -> float:
    start = time.perf_counter()
    for product in products:
        product()
    return time.perf_counter() - start


@torch.no_grad()
def measure(out: int, inp: int, tokens: int, pass_mb: float, repeats: int) -> dict[str, dict[str, float]]:
    copies = max(2, math.ceil(pass_mb * 1e6 / (out * inp * 4))) if tokens == 1 else 2
    weights = [torch.randn(out, inp) for _ in range(copies)]
    transposed = [w.t().contiguous() for w in weights]
    x = torch.randn(tokens, inp)
    forms = {
        "linear [out, in]": [lambda w=w: torch.nn.functional.linear(x, w) for w in weights],
        "x @ W_t [in, out]": [lambda w=w: x @ w for w in transposed],
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for products in forms.values():
        one_pass(products)  # warm-up
    for rep in range(repeats):
        order = list(forms) if rep % 2 == 0 else list(reversed(forms))
        for name in order:
            times[name].append(one_pass(forms[name]) / copies)
    megabytes = out * inp * 4 / 1e6
    result = {}
    for name, values in times.items():
        median = statistics.median(values)
        result[name] = {
            "median_us": median * 1e6,
            "min_us": min(values) * 1e6,
            "max_us": max(values) * 1e6,
            "gb_per_s": megabytes / median / 1e3,  # weights streamed: what bounds one token
            "gflop_per_s": 2 * tokens * out * inp / median / 1e9,  # what bounds a prefill
        }
    linear, transposed_form = (result[name]["median_us"] for name in forms)
    result["ratio linear / x@W_t"] = {"median": linear / transposed_form}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pass-mb", type=float, default=200.0, help="weights read per timed pass (MB)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1], help="rows of x: 1 is decode, 4096 an 8 x 512 prefill"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    for tokens in args.tokens:
        for label, out, inp in SHAPES:
            if tokens > 1 and out > 8192:
                continue  # a prefill computes the vocabulary logits of the last position only
            row = results.setdefault(f"{tokens} token(s)", {})[label] = measure(
                out, inp, tokens, args.pass_mb, args.repeats
            )
            rate, unit = ("gb_per_s", "GB/s") if tokens == 1 else ("gflop_per_s", "GFLOP/s")
            linear, transposed = row["linear [out, in]"], row["x @ W_t [in, out]"]
            logger.info(
                "%4d x %-38s [%5d x %4d]  linear %8.0f us (%5.1f %s)  x@W_t %8.0f us (%5.1f %s)  ratio %.2f",
                tokens,
                label,
                out,
                inp,
                linear["median_us"],
                linear[rate],
                unit,
                transposed["median_us"],
                transposed[rate],
                unit,
                row["ratio linear / x@W_t"]["median"],
            )
    if args.json:
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
        }
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
