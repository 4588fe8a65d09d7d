"""Where a prefill's time goes, per op, for dense and sliced checkpoints side by side (torch.profiler, CPU).

Each model is warmed up with one prefill of the full shape first (so that no model pays the allocator's first
page faults inside its profile), then profiled ``--rounds`` times in an order rotated per round; the table gives
each op's median self-CPU seconds and its call count. Ops are grouped into GEMMs, the attention core and the
rest (elementwise work, copies), the three things slicing shrinks by different amounts. A plugin checkpoint may
also be profiled forced onto its plain (unfused) path with ``NAME:plain=DIR``, or its fused one with
``NAME:fused=DIR`` (as loaded it runs ``fused_inference="auto"``: plain eagerly, fused when compiled).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference_profile.py dense=DENSE layer-25%=LAYER \\
        native-25%=NATIVE --shape 8x512 --rounds 3

With ``--device cuda`` (bfloat16 unless ``--dtype``) each op's time is the GPU time of the kernels it launched, and
a second table gives the CPU time that launched them (what a small, launch-bound shape is made of):

    python3 benchmarks/inference_profile.py dense=DENSE global-25%=GLOBAL --shape 64x512 --device cuda

With ``--decode N`` it profiles ``N`` compiled batch-1 decode steps instead (static cache and ``torch.compile``,
as ``inference_speed.py`` times them; the prompt's prefill and the compilation are outside the profile). GEMMs
are then listed per weight shape, and the table gives milliseconds per token:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference_profile.py dense=DENSE layer-25%=LAYER --decode 16
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from inference_speed import Decoder, compile_options, set_inductor
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import hf_slicegpt  # noqa: F401  (registers the sliced classes)

GROUPS = {
    "GEMMs": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention core": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_cudnn_attention_forward",  # on CUDA the kernels' time sits in these, under the ops above
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
    ),
}


def group_of(op: str) -> str:
    return next((group for group, ops in GROUPS.items() if op in ops), "other (elementwise, copies)")


@torch.no_grad()
def profiled(model, ids: torch.Tensor, clock: str = "cpu") -> dict[str, tuple[int, float]]:
    """Calls and self seconds per op of one prefill: CPU time, or (``clock="device"``) its kernels' GPU time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as prof:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
    # Kernels are listed beside the ops that launched them (whose self GPU time is theirs): ops only. The final
    # synchronisation waits for the GPU; it is not work.
    events = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CPU and e.key != "cudaDeviceSynchronize"
    ]
    if clock == "device":
        return {e.key: (e.count, e.self_device_time_total / 1e6) for e in events}
    return {e.key: (e.count, e.self_cpu_time_total / 1e6) for e in events}


@torch.no_grad()
def profiled_decode(decoder: Decoder, prompt: torch.Tensor) -> dict[str, tuple[int, float]]:
    """Calls and self-CPU seconds per op (GEMMs per input shape) of ``decoder.tokens`` compiled decode steps."""
    token = decoder.start(prompt)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decoder.steps(token)
    ops: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        key = event.key
        if key in GROUPS["GEMMs"]:
            key = f"{key} {event.input_shapes[:2]}"
        calls, seconds = ops.get(key, (0, 0.0))
        ops[key] = (calls + event.count, seconds + event.self_cpu_time_total / 1e6)
    return ops


def load(spec: str, device: torch.device, dtype: torch.dtype):
    name, _, path = spec.partition("=")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if name.endswith((":plain", ":fused")):
        model.set_fused_inference(name.endswith(":fused"))
    return name, model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models",
        nargs="+",
        help="NAME=DIR (NAME:plain=DIR / NAME:fused=DIR: a plugin model forced onto that path)",
    )
    parser.add_argument("--shape", default="8x512", help="prefill BATCHxSEQ")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=14, help="ops shown (by the first model's time)")
    parser.add_argument("--decode", type=int, default=0, help="profile N compiled decode steps instead")
    parser.add_argument("--prompt-len", type=int, default=128, help="the decode's prompt")
    parser.add_argument(
        "--compile-options", nargs="+", default=[], metavar="KEY=VALUE", help="as inference_speed.py's"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    args = parser.parse_args()
    set_inductor(compile_options(args.compile_options))
    torch.set_num_threads(1)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch, seq_len = (1, args.prompt_len) if args.decode else (int(n) for n in args.shape.split("x"))
    models = dict(load(spec, device, dtype) for spec in args.models)
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    if args.decode:
        if device.type != "cpu":
            parser.error("--decode profiles the CPU; on a GPU time the decode with inference_speed.py")
        decoders = {
            name: Decoder(m, args.prompt_len, args.decode, device, compile=True) for name, m in models.items()
        }
        run, per, scale, what = (
            lambda name: profiled_decode(decoders[name], ids),
            args.decode,
            1e3,
            f"compiled decode, {args.decode} steps after {args.prompt_len} tokens: calls per step / self-CPU ms per step",
        )
    else:
        if device.type == "cpu":
            title = f"prefill {batch} x {seq_len}: calls / self-CPU s"
            collect(lambda name: profiled(models[name], ids), list(models), args, 1, 1.0, title)
            return
        for clock, unit in (("device", "GPU ms"), ("cpu", "self-CPU ms")):  # milliseconds on a GPU
            title = f"prefill {batch} x {seq_len}, {dtype}, {device.type}: calls / {unit}"
            collect(lambda name, c=clock: profiled(models[name], ids, c), list(models), args, 1, 1e3, title)
        return
    collect(run, list(models), args, per, scale, what)


def collect(run, names: list[str], args, per: int, scale: float, title: str) -> None:
    """Warm every model up, profile ``--rounds`` rounds in a rotated order, and print the medians."""
    samples: dict[str, dict[str, list]] = {name: defaultdict(list) for name in names}
    for name in names:  # warm-up at the full shape (and compilation)
        run(name)
    for rep in range(args.rounds):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            for op, value in run(name).items():
                samples[name][op].append(value)
    table = {
        name: {
            op: (values[0][0] // per, statistics.median(v[1] for v in values) * scale / per)
            for op, values in ops.items()
        }
        for name, ops in samples.items()
    }
    print_table(table, names, title + f", one thread, median of {args.rounds} profiles", args.rows)


def print_table(
    table: dict[str, dict[str, tuple[int, float]]], names: list[str], title: str, rows: int
) -> None:
    first = table[names[0]]
    ops = sorted(first, key=lambda op: -first[op][1])[:rows]
    ops += [op for name in names[1:] for op in sorted(table[name], key=lambda o: -table[name][o][1])[:rows]]
    print(title + "\n")
    print("| op | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for op in dict.fromkeys(ops):
        cells = [f"{table[n].get(op, (0, 0.0))[0]} / {table[n].get(op, (0, 0.0))[1]:.2f}" for n in names]
        print(f"| `{op}` | " + " | ".join(cells) + " |")
    for group in [*GROUPS, "other (elementwise, copies)"]:
        cells = [
            f"{sum(s for op, (_, s) in table[n].items() if group_of(op.split(' ')[0]) == group):.2f}"
            for n in names
        ]
        print(f"| **{group}** | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"{sum(s for _, s in table[n].values()):.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
