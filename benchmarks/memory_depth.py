"""Peak memory of slicing: does it grow with depth? And SmolLM2 in each mode against a dense load + eval.

Every figure is the peak resident set size (``VmHWM``) of a fresh subprocess that does one thing, so
nothing of one measurement leaks into another.

1. Depth: two random LLaMA checkpoints that differ only in depth (hidden 1024, 8 vs 32 layers by default) are
   saved to disk first (in their own subprocesses), then sliced:
   - ``low-memory``: :func:`hf_slicegpt.runtime.streaming.slice_checkpoint`, activations in host RAM;
   - ``low-memory+disk``: the same with activations in a memory-mapped file;
   - ``default``: load the whole model, ``slice_model``, ``save_pretrained`` (for contrast: grows with depth).
   Target: the deeper checkpoint costs at most 10% more peak RSS on the low-memory path.
2. SmolLM2-135M (``--smollm2``): dense load + held-out perplexity (batch 4, the CLI's default), then slicing
   at 25% with 128 x 512 pydocs calibration tokens in each mode. Target: default mode <= 1.3x the dense figure.

    .venv/bin/python benchmarks/memory_depth.py --json benchmarks/results/memory_depth.json
    .venv/bin/python benchmarks/memory_depth.py --skip-depth --smollm2 --json benchmarks/results/memory_smollm2.json
    .venv/bin/python benchmarks/memory_depth.py --layers 2 4 --hidden 256 --samples 8 --seq-len 64  # smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("memory_depth")

# Each child prints one JSON line: {"max_rss_bytes": ..., ...}. Imports happen inside, so that the parent
# (which only orchestrates) stays small.
_PRELUDE = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[-1]))
def peak():
    # VmHWM: the peak of this process's own address space. ru_maxrss would include the parent's RSS at fork.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
"""

_MAKE = (
    _PRELUDE
    + """
from transformers import LlamaConfig, LlamaForCausalLM
layers, hidden, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=4096,
                     max_position_embeddings=2048, tie_word_embeddings=True)
LlamaForCausalLM(config).save_pretrained(out)
print(json.dumps({"max_rss_bytes": peak()}))
"""
)

_SLICE = (
    _PRELUDE
    + """
import hf_slicegpt
from hf_slicegpt.runtime.streaming import slice_checkpoint
source, out, mode, samples, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if source == "smollm2":
    from hf_slicegpt.workflows.data import calibration_tokens
    from hf_slicegpt.workflows.loading import load_model_and_tokenizer
    from hf_slicegpt.runtime.streaming import resolve_checkpoint
    from transformers import AutoTokenizer
    directory = resolve_checkpoint("smollm2")
    ids = calibration_tokens(AutoTokenizer.from_pretrained(directory), "pydocs", num_samples=samples,
                             seq_len=seq_len, seed=42)
else:
    directory = source
    ids = torch.randint(0, 4096, (samples, seq_len), generator=torch.Generator().manual_seed(0))
if mode == "default":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf_slicegpt.slice_model(model, ids, 0.25, show_progress=False).save_pretrained(out)
else:
    slice_checkpoint(directory, ids, 0.25, out, dtype="float32", show_progress=False,
                     offload="disk" if mode.endswith("disk") else "cpu")
size = sum(f.stat().st_size for f in __import__("pathlib").Path(out).glob("*.safetensors"))
print(json.dumps({"max_rss_bytes": peak(), "seconds": time.perf_counter() - start, "checkpoint_bytes": size}))
"""
)

_DENSE_EVAL = (
    _PRELUDE
    + """
from hf_slicegpt.workflows.data import evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer
model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
ids = evaluation_tokens(tokenizer, "pydocs", seq_len=512)
ppl = perplexity(model, ids, batch_size=4, show_progress=False).perplexity
print(json.dumps({"max_rss_bytes": peak(), "seconds": time.perf_counter() - start, "perplexity": ppl}))
"""
)


def run_child(code: str, *args: object, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args), str(threads)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs=2, default=[8, 32], metavar=("SHALLOW", "DEEP"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (random ids)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["low-memory", "low-memory+disk", "default"])
    parser.add_argument("--skip-depth", action="store_true")
    parser.add_argument("--smollm2", action="store_true", help="also measure SmolLM2 (128 x 512 calibration)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workdir", default=None, help="where the random checkpoints go (default: a temp dir)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    results: dict = {
        "args": vars(args),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "load": os.getloadavg()},
        "depth": {},
        "smollm2": {},
    }

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        if not args.skip_depth:
            for layers in args.layers:
                source = work / f"llama-{layers}"
                made = run_child(_MAKE, layers, args.hidden, source, threads=args.threads)
                size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
                logger.info(
                    "%d layers: checkpoint %s (made with peak RSS %s)",
                    layers,
                    gib(size),
                    gib(made["max_rss_bytes"]),
                )
                row = {"checkpoint_bytes": size}
                for mode in args.modes:
                    out = work / f"sliced-{layers}-{mode}"
                    row[mode] = run_child(
                        _SLICE, source, out, mode, args.samples, args.seq_len, threads=args.threads
                    )
                    logger.info("%d layers, %s: %s", layers, mode, row[mode])
                results["depth"][layers] = row
        if args.smollm2:
            results["smollm2"]["dense load + eval"] = run_child(_DENSE_EVAL, threads=args.threads)
            logger.info("SmolLM2 dense load + eval: %s", results["smollm2"]["dense load + eval"])
            for mode in args.modes:
                out = work / f"smollm2-{mode}"
                results["smollm2"][mode] = run_child(
                    _SLICE, "smollm2", out, mode, 128, 512, threads=args.threads
                )
                logger.info("SmolLM2 %s: %s", mode, results["smollm2"][mode])
    results["machine"]["load_at_end"] = os.getloadavg()

    if results["depth"]:
        shallow, deep = (results["depth"][n] for n in args.layers)
        print(f"\nRandom LLaMA, hidden {args.hidden}, {args.samples} x {args.seq_len} calibration tokens")
        print(f"| mode | {args.layers[0]} layers | {args.layers[1]} layers | deep / shallow |")
        print("|---|---|---|---|")
        print(f"| source checkpoint | {gib(shallow['checkpoint_bytes'])} | {gib(deep['checkpoint_bytes'])} | "
              f"{deep['checkpoint_bytes'] / shallow['checkpoint_bytes']:.2f}x |")  # fmt: skip
        for mode in args.modes:
            a, b = shallow[mode]["max_rss_bytes"], deep[mode]["max_rss_bytes"]
            print(f"| {mode} peak RSS | {gib(a)} | {gib(b)} | {b / a:.3f}x |")
    if results["smollm2"]:
        dense = results["smollm2"]["dense load + eval"]["max_rss_bytes"]
        print("\nSmolLM2-135M (fp32), 25%, 128 x 512 calibration")
        print("| run | peak RSS | / dense load + eval | time (s) |")
        print("|---|---|---|---|")
        for name, row in results["smollm2"].items():
            print(
                f"| {name} | {gib(row['max_rss_bytes'])} | {row['max_rss_bytes'] / dense:.2f}x | {row['seconds']:.0f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
