"""Where a prefill's time goes, per op, for dense and sliced checkpoints side by side (torch.profiler, CPU).

Each model is warmed up with one prefill of the full shape first (so that no model pays the allocator's first
page faults inside its profile), then profiled ``--rounds`` times in an order rotated per round; the table gives
each op's median self-CPU seconds and its call count. Ops are grouped into GEMMs, the attention core and the
rest (elementwise work, copies), the three things slicing shrinks by different amounts. A plugin checkpoint may
also be profiled on its plain (unfused) path with ``NAME:plain=DIR``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference_profile.py dense=DENSE layer-25%=LAYER \\
        native-25%=NATIVE --shape 8x512 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import hf_slicegpt  # noqa: F401  (registers the sliced classes)

GROUPS = {
    "GEMMs": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention core": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
    ),
}


def group_of(op: str) -> str:
    return next((group for group, ops in GROUPS.items() if op in ops), "other (elementwise, copies)")


@torch.no_grad()
def profiled(model, ids: torch.Tensor) -> dict[str, tuple[int, float]]:
    """Calls and self-CPU seconds per op of one prefill."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()}


def load(spec: str):
    name, _, path = spec.partition("=")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if name.endswith(":plain"):
        model.set_fused_inference(False)
    return name, model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="NAME=DIR (NAME:plain=DIR: a plugin model's unfused path)")
    parser.add_argument("--shape", default="8x512", help="prefill BATCHxSEQ")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=14, help="ops shown (by the first model's time)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch, seq_len = (int(n) for n in args.shape.split("x"))
    models = dict(load(spec) for spec in args.models)
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    samples: dict[str, dict[str, list]] = {name: defaultdict(list) for name in models}
    for model in models.values():  # warm-up at the full shape
        profiled(model, ids)
    names = list(models)
    for rep in range(args.rounds):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            for op, value in profiled(models[name], ids).items():
                samples[name][op].append(value)
    table = {
        name: {op: (values[0][0], statistics.median(v[1] for v in values)) for op, values in ops.items()}
        for name, ops in samples.items()
    }
    first = table[names[0]]
    print(f"prefill {batch} x {seq_len}, one thread, median of {args.rounds} profiles: calls / self-CPU s\n")
    print("| op | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for op in sorted(first, key=lambda op: -first[op][1])[: args.rows]:
        cells = [f"{table[n].get(op, (0, 0.0))[0]} / {table[n].get(op, (0, 0.0))[1]:.2f}" for n in names]
        print(f"| `{op}` | " + " | ".join(cells) + " |")
    for group in [*GROUPS, "other (elementwise, copies)"]:
        cells = [f"{sum(s for op, (_, s) in table[n].items() if group_of(op) == group):.2f}" for n in names]
        print(f"| **{group}** | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"{sum(s for _, s in table[n].values()):.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
