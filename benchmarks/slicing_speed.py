"""Slicing speed: wall time of ``slice_model`` against one dense forward pass over the same tokens, same run.

Layer-wise slicing computes each block once over the calibration tokens, plus covariance sums and one small
eigendecomposition per signal, and never the lm_head; so the floor is below one full dense forward (lm_head
included, as a user would run the model). The ratio slice / dense is the figure of merit (target <= 1.2).

Order of the timed runs: dense, slice (each covariance precision), dense again; the dense figure is the median
of the two, so a machine whose load drifts during the run is bracketed. Each sliced model is scored on the
held-out pydocs tail, so a faster covariance path is kept only if the perplexity is unchanged. With
``--profile``, the first slicing run is profiled and its time is split into phases.

    .venv/bin/python benchmarks/slicing_speed.py                                   # 128 x 512, SmolLM2, CPU
    .venv/bin/python benchmarks/slicing_speed.py --threads 1 --json benchmarks/results/slicing_speed.json
    .venv/bin/python benchmarks/slicing_speed.py --num-samples 8 --seq-len 128 --precisions mixed  # smoke
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import platform
import pstats
import statistics
import time

import torch

from hf_slicegpt import slicing
from hf_slicegpt.slicing import pca
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("slicing_speed")

# Profile phases: (label, [(file suffix, function name)]); cumulative times of these functions.
PHASES = [
    # (with the correction, the dense stream's MLP forwards count here too)
    ("block compute (attention + MLP at sliced width)", [("signals.py", "attention"), ("modeling_llama.py", "forward")]),
    ("covariance sums", [("pca.py", "add")]),
    ("eigendecompositions", [("pca.py", "eigenbasis")]),
    # (a plain update sums in its input basis's frame and expands nothing; the correction's updates expand)
    ("signal rotations (expand to full width or make frames, rotate back)", [
        ("signals.py", "expand"), ("signals.py", "signal_frame"), ("signals.py", "rotate_signals"),
    ]),
    ("weight rotations (fold, rotate, shortcuts, writers into frames)", [
        ("rotate.py", "rotate_readers"), ("rotate.py", "rotate_writer"), ("rotate.py", "shortcut"),
        ("rotate.py", "center_writer_module"), ("rotate.py", "writers_in_frame"),
    ]),
    ("embeddings, masks, rotary tables", [("signals.py", "embed_calibration")]),
    ("correction: dense stream (dense block forwards)", [("refit.py", "dense_targets")]),
    ("correction: normal equations", [("correction.py", "add")]),
    ("correction: ridge solves and corrected signals", [("refit.py", "apply_correction")]),
    ("assembling the sliced model", [("assemble.py", "assemble")]),
]  # fmt: skip


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the allocator's and kernels' settings: glibc's thresholds alone moved the dense forward by 8% (BENCHMARKS.md)
        "environment": {
            k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_", "ATEN_"))
        },
        "load_average_at_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def dense_forward_seconds(model, calibration: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """One full forward (lm_head included, logits materialised) over every calibration batch."""
    _sync(device)
    start = time.perf_counter()
    for i in range(0, calibration.shape[0], batch_size):
        logits = model(calibration[i : i + batch_size].to(device)).logits
        del logits
    _sync(device)
    return time.perf_counter() - start


def phase_split(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    split = {}
    for label, functions in PHASES:
        split[label] = sum(
            ct
            for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.items()
            if any(file.endswith(suffix) and name == fn for suffix, fn in functions)
            and not (name == "forward" and "MLP" not in _qualname_hint(file, _line))
            # correction.py's SplitEquations.add calls NormalEquations.add: count the outer one only
            and not (file.endswith("correction.py") and "SplitEquations" not in _qualname_hint(file, _line))
        )
    return split


def _qualname_hint(file: str, line: int) -> str:
    """The class around ``file:line`` (to count LlamaMLP.forward but not the other forwards)."""
    try:
        with open(file) as handle:
            lines = handle.readlines()[:line]
    except OSError:
        return ""
    for text in reversed(lines):
        if text.startswith("class "):
            return text
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--precisions", nargs="+", default=["mixed", "float64"], choices=pca.PRECISIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--eval-max-tokens", type=int, default=None, help="cap the held-out evaluation")
    parser.add_argument(
        "--profile", action="store_true", help="profile the first slicing run, split by phase"
    )
    parser.add_argument(
        "--no-dense",
        action="store_true",
        help="only slice and score (e.g. a second precision run alongside a full one); no ratio",
    )
    parser.add_argument(
        "--correction",
        choices=["ridge", "none"],
        default=slicing.SlicingConfig(sparsity=0.0).correction,
        help="the output-aware correction (default: the library's default); none: the paper's loop alone",
    )
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    def load():
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        return model.to(device).eval(), tokenizer

    model, tokenizer = load()
    calibration = calibration_tokens(
        tokenizer, "pydocs", num_samples=args.num_samples, seq_len=args.seq_len, seed=42
    )
    evaluation = evaluation_tokens(tokenizer, "pydocs", seq_len=args.seq_len, max_tokens=args.eval_max_tokens)
    info = machine()
    logger.info(
        "Machine %s; calibration %s; evaluation %s", info, tuple(calibration.shape), tuple(evaluation.shape)
    )

    dense_seconds = (
        [] if args.no_dense else [dense_forward_seconds(model, calibration, args.batch_size, device)]
    )
    if dense_seconds:
        logger.info("dense forward: %.1f s", dense_seconds[0])
    dense_ppl = perplexity(model, evaluation, batch_size=4, show_progress=False).perplexity
    del model

    rows, profile_split = [], None
    for precision in args.precisions:
        model, _ = load()
        profiler = cProfile.Profile() if args.profile and profile_split is None else None
        _sync(device)
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        sliced = slicing.slice_model(
            model,
            calibration,
            slicing.SlicingConfig(
                sparsity=args.sparsity, covariance_precision=precision, correction=args.correction
            ),
            batch_size=args.batch_size,
            device=device,
            show_progress=False,
        )
        if profiler:
            profiler.disable()
        _sync(device)
        seconds = time.perf_counter() - start
        if profiler:
            profile_split = phase_split(profiler)
            profile_split["total"] = seconds
        ppl = perplexity(sliced, evaluation, batch_size=4, show_progress=False).perplexity
        rows.append({"precision": precision, "slice_s": seconds, "sliced_ppl": ppl})
        logger.info("slice (%s covariance): %.1f s, held-out ppl %.4f", precision, seconds, ppl)
        del sliced, model

    if not args.no_dense:
        model, _ = load()
        dense_seconds.append(dense_forward_seconds(model, calibration, args.batch_size, device))
        logger.info("dense forward again: %.1f s", dense_seconds[1])
    dense = statistics.median(dense_seconds) if dense_seconds else float("nan")
    for row in rows:
        row["ratio"] = row["slice_s"] / dense

    info["load_average_at_end"] = os.getloadavg()
    print(
        f"\nSmolLM2 slicing at {args.sparsity:.0%}, calibration pydocs {args.num_samples} x {args.seq_len} "
        f"(batch {args.batch_size}), {device} {dtype}\nmachine: {info}\n"
        f"dense forward (lm_head included): {', '.join(f'{s:.1f}' for s in dense_seconds)} s, median {dense:.1f} s;"
        f" dense held-out ppl {dense_ppl:.4f}\n"
    )
    print("| covariance | slice (s) | slice / dense forward | sliced held-out ppl |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['precision']} | {row['slice_s']:.1f} | {row['ratio']:.2f} | {row['sliced_ppl']:.4f} |")
    if profile_split:
        print(f"\nwhere the time goes ({args.precisions[0]} covariance; phases can nest slightly):")
        for label, seconds in profile_split.items():
            print(f"  {label:55s} {seconds:8.1f} s  {seconds / profile_split['total']:6.1%}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "args": vars(args),
                    "machine": info,
                    "dense_forward_s": dense_seconds,
                    "dense_ppl": dense_ppl,
                    "rows": rows,
                    "profile": profile_split,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
