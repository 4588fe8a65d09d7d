"""Inference speed-up of sliced SmolLM2 against dense: prefill throughput, decode tokens/s, peak memory.

Each figure is set against the FLOP-ideal speed-up: dense FLOPs / sliced FLOPs of the same forward, counted by
``torch.utils.flop_counter`` on the models as they run (so it is "what slicing removes minus what the
shortcuts and embedding/head projections add"). Target: the prefill speed-up reaches >= 90% of it.

- prefill: ``batch x seq_len`` tokens in one forward with the KV cache on and logits for the last position, as
  ``generate`` runs it (default CPU 8 x 512; CUDA 32 x 512);
- decode: tokens/s at batch 1 with the KV cache, after a 128-token prompt;
- peak memory: CPU peak RSS (``VmHWM``) of a fresh process that loads the model and runs one prefill; CUDA
  ``max_memory_allocated``. (Not ``ru_maxrss``: on Linux a child inherits the parent's peak across exec.)

All models are loaded in one process and timed round-robin (dense, 20%, 25%, 30%, dense, ...), so a machine
whose load drifts affects each alike; figures are medians. Sliced models are made here with a small calibration
set (speed does not depend on it), or read from ``--checkpoints``.

    .venv/bin/python benchmarks/inference_speed.py --json benchmarks/results/inference_speed_cpu.json
    .venv/bin/python benchmarks/inference_speed.py --device cuda --json benchmarks/results/inference_speed_cuda.json
    .venv/bin/python benchmarks/inference_speed.py --batch 2 --seq-len 64 --decode-tokens 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer, resolve_source

logger = logging.getLogger("inference_speed")

_PEAK_CHILD = """
import json, resource, sys, torch, hf_slicegpt
from transformers import AutoModelForCausalLM
path, batch, seq_len, threads, dtype, vocab = sys.argv[1:7]
torch.set_num_threads(int(threads))
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
ids = torch.randint(0, int(vocab), (int(batch), int(seq_len)), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"max_rss_bytes": peak}))
"""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, tokens: int, device: torch.device) -> float:
    """Seconds for ``tokens`` greedy single-token steps with the KV cache, after the prompt's prefill."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    token = out.logits[:, -1:].argmax(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        token = out.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def flops(model, ids: torch.Tensor, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, **kwargs)
    return counter.get_total_flops()


def decode_flops(model, prompt: torch.Tensor) -> int:
    """FLOPs of one decode step after ``prompt`` (the attention reads the prompt's cache)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return flops(model, prompt[:, -1:], cache=cache, use_cache=True)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.20, 0.25, 0.30])
    parser.add_argument(
        "--checkpoints", nargs="*", default=None, help="sliced checkpoint dirs (skip slicing)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument(
        "--batch", type=int, default=None, help="prefill batch (default: 8 on CPU, 32 on CUDA)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calibration-samples", type=int, default=16, help="for slicing here (x 512 tokens)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    batch = args.batch or (32 if device.type == "cuda" else 8)
    info = {
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": dtype_name,
        "load_average_at_start": os.getloadavg(),
    }

    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="inference-speed-"))
    dense, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    dense_dir = work / "dense"
    dense.save_pretrained(dense_dir)
    paths = {"dense": dense_dir}
    if args.checkpoints:
        for path in args.checkpoints:
            config = json.loads((Path(path) / "config.json").read_text())
            paths[f"{config['slicing']['sparsity']:.0%}"] = Path(path)
    else:
        calibration = calibration_tokens(
            tokenizer, "pydocs", num_samples=args.calibration_samples, seq_len=512, seed=42
        )
        for sparsity in args.sparsities:
            model, _ = load_model_and_tokenizer(args.model, dtype="float32")
            sliced = hf_slicegpt.slice_model(model, calibration, sparsity, show_progress=False)
            paths[f"{sparsity:.0%}"] = work / f"sliced-{sparsity}"
            sliced.save_pretrained(paths[f"{sparsity:.0%}"])
            logger.info("sliced %.0f%% -> %s", sparsity * 100, paths[f"{sparsity:.0%}"])
            del model, sliced
    del dense

    models = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        for name, path in paths.items()
    }
    vocab = models["dense"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, args.seq_len), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)

    rows = {name: {"prefill_s": [], "decode_s": []} for name in models}
    for name, model in models.items():
        rows[name]["prefill_flops"] = flops(model, ids, use_cache=True, logits_to_keep=1)
        rows[name]["decode_flops"] = decode_flops(model, prompt)
        rows[name]["parameter_bytes"] = parameter_bytes(model)
        prefill(model, ids[:1, :64])  # warm-up
    for rep in range(args.repeats):
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            prefill(model, ids)
            sync(device)
            rows[name]["prefill_s"].append(time.perf_counter() - start)
            rows[name]["decode_s"].append(decode(model, prompt, args.decode_tokens, device))
            logger.info(
                "rep %d %s: prefill %.2f s, decode %.2f s",
                rep,
                name,
                rows[name]["prefill_s"][-1],
                rows[name]["decode_s"][-1],
            )

    for name, path in paths.items():
        if device.type == "cuda":
            model = models[name]
            torch.cuda.reset_peak_memory_stats(device)
            prefill(model, ids)
            rows[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        else:
            threads = str(torch.get_num_threads())
            child = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _PEAK_CHILD,
                    str(path),
                    str(batch),
                    str(args.seq_len),
                    threads,
                    dtype_name,
                ]
                + [str(vocab)],
                capture_output=True,
                text=True,
            )
            if child.returncode != 0:
                raise RuntimeError(child.stderr[-3000:])
            rows[name]["peak_memory_bytes"] = json.loads(child.stdout.strip().splitlines()[-1])[
                "max_rss_bytes"
            ]

    base = rows["dense"]
    dense_prefill, dense_decode = statistics.median(base["prefill_s"]), statistics.median(base["decode_s"])
    info["load_average_at_end"] = os.getloadavg()
    print(
        f"\n{resolve_source(args.model)}: {device} {dtype_name}, prefill {batch} x {args.seq_len}, decode "
        f"{args.decode_tokens} tokens at batch 1 after {args.prompt_len}; medians of {args.repeats}\nmachine: {info}\n"
    )
    print(
        "| model | prefill tok/s | prefill speed-up | FLOP-ideal | speed-up / ideal | decode tok/s | decode speed-up "
        "| decode FLOP-ideal | weights | peak memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        p, d = statistics.median(row["prefill_s"]), statistics.median(row["decode_s"])
        row["prefill_tokens_per_s"] = batch * args.seq_len / p
        row["decode_tokens_per_s"] = args.decode_tokens / d
        row["prefill_speedup"] = dense_prefill / p
        row["prefill_ideal"] = base["prefill_flops"] / row["prefill_flops"]
        row["decode_speedup"] = dense_decode / d
        row["decode_ideal"] = base["decode_flops"] / row["decode_flops"]
        print(
            f"| {name} | {row['prefill_tokens_per_s']:.0f} | {row['prefill_speedup']:.3f}x | "
            f"{row['prefill_ideal']:.3f}x | {row['prefill_speedup'] / row['prefill_ideal']:.0%} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['decode_speedup']:.3f}x | {row['decode_ideal']:.3f}x | "
            f"{row['parameter_bytes'] / 2**20:.0f} MiB | {row['peak_memory_bytes'] / 2**20:.0f} MiB |"
        )
    if args.json:
        existing = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        existing[f"{device.type}-{dtype_name}"] = {"args": vars(args), "machine": info, "rows": rows}
        Path(args.json).write_text(json.dumps(existing, indent=2) + "\n")


if __name__ == "__main__":
    main()
