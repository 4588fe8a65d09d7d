"""Inference speed and memory of sliced SmolLM2 against dense, with a protocol that holds on a noisy machine.

Every figure is set against the FLOP ideal of its shape: ``ideal = dense FLOPs / sliced FLOPs`` of the same
forward, counted by ``torch.utils.flop_counter`` on the models as they run (so the shortcuts and the embedding/head
projections that slicing adds are in it), with the attention core counted too (:func:`attention_flops`). The
headline is the *realised share of the ideal gain*, ``(measured - 1) / (ideal - 1)``: 100% means the sliced
model is exactly as much faster as its FLOPs allow.

Protocol:

- all models are loaded in one process, threads pinned (``--threads``, default 1), and timed round-robin: each
  round runs dense and every sliced model once, in an order rotated from round to round, so a machine whose
  load drifts affects each alike; ``--repeats`` rounds (>= 7) after one warm-up round;
- per model: the median time and its spread (min-max and IQR); per sliced model: the speed-up of the medians,
  the median of the per-round paired speed-ups (dense time / sliced time in the same round) with their min-max,
  the speed-up of the best runs (noise only adds time), and the realised share of each;
- glibc's allocator is told to keep freed buffers (``--allocator steady``, the default; :func:`steady_allocator`):
  otherwise some rounds page-fault a forward's large buffers back in and others do not;
- prefill: ``batch x seq_len`` tokens in one forward with the KV cache on and logits for the last position, as
  ``generate`` runs it (``--shapes``, default 8x512 1x1024 8x256);
- decode: batch 1, a static KV cache and ``torch.compile`` for dense and sliced alike, greedy tokens/s after a
  ``--prompt-len`` prompt (the prompt's prefill is not timed); ``--compile-options`` sets inductor settings for
  every model alike (on CPU ``freezing=True max_autotune=True max_autotune_gemm_backends=CPP,ATEN`` prepacks the
  weights and autotunes each GEMM against C++ templates), and each model's compiled greedy tokens are checked
  against its eager ones;
- peak memory: ``VmHWM`` of a fresh process per model that loads it with ``from_pretrained`` and runs one prefill
  of the first shape. Target: sliced peak <= dense peak - weights saved + 5% of the dense peak.

Models: ``--dense DIR`` and ``--checkpoints DIR ...`` (sliced checkpoints in the plugin format, or native exports);
each is labelled by its slicing mode (``layer``, ``global``, ``native``) and sparsity. Without them, the script
slices SmolLM2 here (``--modes``, ``--sparsities``; 16 x 512 pydocs windows: speed does not depend on them), on
``--slice-device`` (default: ``--device``). ``--with-plain`` / ``--with-fused`` also time each plugin model forced
onto its plain or fused path (as loaded it runs ``fused_inference="auto"``). ``--random-weights`` draws the
dense weights at random for the config and tokenizer in ``--dense``: for a machine the real weights cannot reach
(``benchmarks/gpu_inference.sh``, the GPU run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference_speed.py --json benchmarks/results/inference_speed_cpu.json
    .venv/bin/python benchmarks/inference_speed.py --device cuda --dtype bfloat16 --shapes 1x512 8x512 64x512 \
        --compile-options triton.cudagraphs=True   # the GPU run in full: benchmarks/gpu_inference.sh
    .venv/bin/python benchmarks/inference_speed.py --shapes 2x64 --repeats 2 --decode-tokens 4 --no-compile  # smoke
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, StaticCache

import hf_slicegpt
from hf_slicegpt.modeling.modeling_sliced import CACHE_NAME
from hf_slicegpt.workflows.data import calibration_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("inference_speed")

_PEAK_CHILD = """
import json, sys, torch, hf_slicegpt
from transformers import AutoModelForCausalLM
path, batch, seq_len, threads, dtype, vocab, device = sys.argv[1:8]
torch.set_num_threads(int(threads))
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
if device != "cpu":  # on the CPU as loaded: .to() would rebuild the fused matrices that loading read from the file
    model.to(device)
ids = torch.randint(0, int(vocab), (int(batch), int(seq_len)), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(input_ids=ids.to(device), use_cache=True, logits_to_keep=1)
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
peak = {"peak_rss_bytes": status["VmHWM"], "rss_bytes": status["VmRSS"]}
if device.startswith("cuda"):
    peak["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
print(json.dumps(peak))
"""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _slicing(path: Path) -> dict:
    """The slicing record of a checkpoint's config (empty for dense models and native exports)."""
    return json.loads((path / "config.json").read_text()).get("slicing") or {}


def label(path: Path) -> str:
    """``layer-25%``, ``global-25%`` or ``native-25%`` from a checkpoint's config; ``dense`` otherwise."""
    slicing = _slicing(path)
    if "sparsity" not in slicing:
        return path.name  # a native export carries no slicing record: name it with NAME=DIR
    mode = slicing.get("rotation", "layer")
    return f"{mode}-{slicing['sparsity']:.0%}"


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


# environment variables recorded with the machine: each changes what the kernels or the allocator do
ENV_RECORDED = ("MALLOC_", "OMP_", "MKL_", "ATEN_CPU_CAPABILITY")
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def attention_flops(op_name: str):
    """FLOPs of one fused attention call: ``2 (d_qk + d_v)`` per query-key pair it attends.

    torch's counter leaves the CPU kernel out (so the FLOP ideal of a CPU prefill ignored the attention core,
    which slicing does not shrink) and counts causal attention as full. Here causal attention counts the pairs
    it computes and a mask counts its allowed entries: the smallest honest count, so the ideal is not
    understated.
    """
    names = [a.name for a in getattr(torch.ops.aten, op_name).default._schema.arguments]

    def count(*args, out_val=None, **kwargs) -> int:
        bound = {**dict(zip(names, args)), **kwargs}
        query, key, value = bound["query"], bound["key"], bound["value"]
        batch, heads, s_q, d_qk = query.shape
        s_k, d_v = key.shape[-2], value.shape[-1]
        mask = bound.get("attn_mask", bound.get("attn_bias"))
        if bound.get("is_causal"):
            pairs = batch * heads * sum(min(i + 1, s_k) for i in range(s_q))  # top-left aligned, as torch's
        elif mask is not None:
            allowed = mask if mask.dtype == torch.bool else mask > float("-inf")
            pairs = int(allowed.expand(batch, heads, s_q, s_k).sum())
        else:
            pairs = batch * heads * s_q * s_k
        return 2 * pairs * (d_qk + d_v)

    count._get_raw = True  # FlopCounterMode: pass the tensors, not their shapes
    return count


FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): attention_flops(name)
    for name in _ATTENTION_OPS
    if hasattr(torch.ops.aten, name)
}


def count_flops(run) -> int:
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        run()
    return counter.get_total_flops()


@torch.no_grad()
def prefill_flops(model, ids: torch.Tensor) -> int:
    return count_flops(lambda: prefill(model, ids))


class Decoder:
    """Batch-1 greedy decode with a static KV cache; the step is ``torch.compile``-d (unless ``compile=False``).

    The cache goes in under the keyword this transformers reads (``CACHE_NAME``: ``past_key_values`` before 5.24,
    ``cache`` from it on). Under the other name a transformers model takes it into ``**kwargs`` and ignores it:
    until 2026-12-03 the dense model decoded here attended to the current token only (cheaper and wrong), while
    the plugin's model, which reads both names, used its cache.
    """

    def __init__(self, model, prompt_len: int, tokens: int, device: torch.device, compile: bool):
        self.model, self.prompt_len, self.tokens, self.device = model, prompt_len, tokens, device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + tokens + 1)
        self.step = torch.compile(model, dynamic=False, fullgraph=False) if compile else model

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        """Reset the cache, prefill ``prompt`` into it (eager, untimed) and return the first greedy token."""
        self.cache.reset()
        positions = torch.arange(prompt.shape[1], device=self.device)[None]
        out = self.model(
            input_ids=prompt,
            position_ids=positions,
            **{CACHE_NAME: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def run(self, prompt: torch.Tensor) -> tuple[float, float]:
        """Wall and CPU seconds for ``tokens`` single-token steps after the (untimed) prompt."""
        token = self.start(prompt)
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.steps(token)
        sync(self.device)
        return time.perf_counter() - wall, time.process_time() - cpu

    @torch.no_grad()
    def steps(self, token: torch.Tensor) -> torch.Tensor:
        """``tokens`` greedy single-token steps after the prompt's cache (what :meth:`run` times); their tokens."""
        generated = []
        for i in range(self.tokens):
            position = torch.full((1, 1), self.prompt_len + i, device=self.device, dtype=torch.long)
            out = self.step(
                input_ids=token, position_ids=position, **{CACHE_NAME: self.cache}, use_cache=True
            )
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
        return torch.cat(generated, 1)

    @torch.no_grad()
    def agreement(self, prompt: torch.Tensor) -> int:
        """How many greedy tokens the timed (compiled) steps give equal to the eager model's, up to the first that
        differs: compile settings such as freezing must not change what is decoded."""
        timed = self.steps(self.start(prompt))
        step, self.step = self.step, self.model
        try:
            eager = self.steps(self.start(prompt))
        finally:
            self.step = step
        return int((timed == eager).long().cumprod(-1).sum())

    @torch.no_grad()
    def flops(self, prompt: torch.Tensor) -> int:
        """FLOPs of one decode step after the prompt (the attention reads the prompt's cache), eager."""
        token = self.start(prompt)
        position = torch.full((1, 1), self.prompt_len, device=self.device, dtype=torch.long)
        return count_flops(
            lambda: self.model(
                input_ids=token, position_ids=position, **{CACHE_NAME: self.cache}, use_cache=True
            )
        )


def compile_options(items: list[str]) -> dict[str, object]:
    """``["freezing=True", "triton.cudagraphs=True"]`` -> inductor settings (Python literals, else str), each
    checked to be a ``torch._inductor.config`` name (dotted for a nested one)."""
    import torch._inductor.config as inductor_config

    options: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"compile option {item!r} is not KEY=VALUE; e.g. freezing=True")
        if not hasattr(inductor_config, key):
            raise ValueError(f"compile option {key!r} is not a torch._inductor.config setting")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def set_inductor(options: dict[str, object]) -> None:
    """Apply inductor settings process-wide, for every model alike.

    Not through ``torch.compile(options=...)``: with torch 2.13 ``freezing`` and ``max_autotune`` given there
    do not take effect (dynamo reads ``freezing`` when it traces, before the options are patched in; checked: no
    GEMM is autotuned), while set on ``torch._inductor.config`` they do.
    """
    import torch._inductor.config as inductor_config

    for key, value in options.items():
        setattr(inductor_config, key, value)


def spread(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": quartiles[0],
        "q3": quartiles[2],
    }


def realised(speedup: float, ideal: float) -> float:
    return (speedup - 1) / (ideal - 1) if ideal != 1 else float("nan")


def round_robin(models: dict, run, repeats: int) -> dict[str, dict[str, list[float]]]:
    """``repeats`` rounds of ``run(name, model)``, every model once per round, in an order rotated each round.

    Returns wall-clock and process CPU seconds per model, and the minor page faults of each run
    (``"faults"``: a run that faults its buffers back in is slower for it, see :func:`steady_allocator`).
    With one pinned thread, CPU time is the work the process did, which a machine shared with other jobs
    inflates far less than wall time (it still feels the caches and memory bandwidth that other jobs take).
    """
    names = list(models)
    times: dict[str, dict[str, list[float]]] = {k: {n: [] for n in names} for k in ("wall", "cpu", "faults")}
    for rep in range(-1, repeats):  # round -1 warms up (and compiles)
        order = names[rep % len(names) :] + names[: rep % len(names)] if rep >= 0 else names
        for name in order:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu = time.perf_counter(), time.process_time()
            run(name, models[name])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if rep >= 0:
                times["wall"][name].append(wall)
                times["cpu"][name].append(cpu)
                times["faults"][name].append(faults)
        if rep >= 0:
            logger.info("round %d wall: %s", rep, {n: round(t[-1], 3) for n, t in times["wall"].items()})
    return times


def summarise(times: dict[str, list[float]], work: dict[str, int], per: float) -> dict[str, dict]:
    """Per model: time spread, throughput, speed-ups (of medians, and paired per round) and realised shares."""
    dense = times["dense"]
    rows = {}
    for name, values in times.items():
        row = {"seconds": spread(values), "throughput": per / statistics.median(values), "flops": work[name]}
        ideal = work["dense"] / work[name]
        paired = [d / s for d, s in zip(dense, values)]
        row.update(
            ideal=ideal,
            speedup=statistics.median(dense) / statistics.median(values),
            paired_speedup=spread(paired),
        )
        # best of the rounds: noise on a shared machine only adds time, so the fastest runs are the least disturbed
        row["best_speedup"] = min(dense) / min(values)
        row["realised"] = realised(row["speedup"], ideal)
        row["paired_realised"] = realised(row["paired_speedup"]["median"], ideal)
        row["best_realised"] = realised(row["best_speedup"], ideal)
        rows[name] = row
    return rows


def table(title: str, rows: dict[str, dict], unit: str) -> str:
    lines = [
        f"\n{title}\n",
        f"| model | {unit} (median) | time s: median [min-max] | speed-up (medians) | paired speed-up: "
        "median [min-max] | speed-up (best runs) | FLOP ideal | realised share (medians / paired / best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        s, p = row["seconds"], row["paired_speedup"]
        share = (
            ""
            if name == "dense"
            else f"{row['realised']:.0%} / {row['paired_realised']:.0%} / {row['best_realised']:.0%}"
        )
        lines.append(
            f"| {name} | {row['throughput']:.1f} | {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}] | "
            f"{row['speedup']:.3f}x | {p['median']:.3f}x [{p['min']:.3f}-{p['max']:.3f}] | "
            f"{row['best_speedup']:.3f}x | {row['ideal']:.3f}x | {share} |"
        )
    return "\n".join(lines)


def load(path: Path, name: str, dtype: torch.dtype, device: torch.device):
    """``from_pretrained`` as a user runs it (``fused_inference="auto"``); a ``NAME:plain`` or ``NAME:fused``
    plugin model is forced onto its plain or fused path."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if name.endswith((":plain", ":fused")):
        model.set_fused_inference(name.endswith(":fused"))
    return model


def random_dense(source: Path, out: Path) -> Path:
    """A dense checkpoint with ``source``'s config and tokenizer and seeded random weights.

    For a machine the real weights cannot reach (the device machine takes 64 MiB of files; SmolLM2's GGUF is
    98 MB): a forward's time does not depend on the values in its matrices, only on their shapes and dtype.
    """
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def prepare_models(args, work: Path) -> dict[str, Path]:
    """Checkpoint directories by label: the given ones, or SmolLM2 saved and sliced here."""
    if args.dense and args.random_weights:
        paths = {"dense": random_dense(Path(args.dense), work / "dense")}
    elif args.dense:
        paths = {"dense": Path(args.dense)}
    else:
        dense, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
        paths = {"dense": work / "dense"}
        dense.save_pretrained(paths["dense"])
        tokenizer.save_pretrained(paths["dense"])
        del dense
    if args.checkpoints:
        for spec in args.checkpoints:
            name, _, path = spec.rpartition("=")
            paths[name or label(Path(path))] = Path(path)
        return paths
    _, tokenizer = load_model_and_tokenizer(str(paths["dense"]), dtype="float32")
    if args.random_weights:  # random weights read random tokens: real text would tell them nothing
        generator = torch.Generator().manual_seed(42)
        vocab = AutoConfig.from_pretrained(paths["dense"]).vocab_size
        calibration = torch.randint(0, vocab, (16, 512), generator=generator)
    else:
        calibration = calibration_tokens(tokenizer, "pydocs", num_samples=16, seq_len=512, seed=42)
    for mode in args.modes:
        for sparsity in args.sparsities:
            model, _ = load_model_and_tokenizer(str(paths["dense"]), dtype="float32")
            rotation = "layer" if mode == "layer" else "global"
            # A native config needs a width that is a multiple of the heads: the finest even one (18 for
            # SmolLM2: 450 / 432 / 396 at 20 / 25 / 30%), labelled with the sparsity it really has.
            heads, hidden = model.config.num_attention_heads, model.config.hidden_size
            round_to = math.lcm(2, heads) if mode == "native" else 8
            config = hf_slicegpt.SlicingConfig(
                sparsity=sparsity, rotation=rotation, correction=args.correction, round_to=round_to
            )
            sliced = hf_slicegpt.slice_model(
                model, calibration, config=config, device=args.slice_device, show_progress=False
            )
            path = work / f"{mode}-{sparsity}"
            if mode == "native":
                hf_slicegpt.save_native(sliced, path)
            else:
                sliced.save_pretrained(path)
            real = sparsity
            if mode == "native":
                real = 1 - json.loads((path / "config.json").read_text())["hidden_size"] / hidden
            paths[f"{mode}-{real:.0%}"] = path
            logger.info("sliced %s %.0f%% -> %s", mode, sparsity * 100, path)
    return paths


def peak_memory(path: Path, shape: tuple[int, int], args, vocab: int) -> dict[str, int]:
    child = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(path), str(shape[0]), str(shape[1]), str(args.threads)]
        + [args.dtype, str(vocab), args.device],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    if child.returncode != 0:
        raise RuntimeError(child.stderr[-3000:])
    return json.loads(child.stdout.strip().splitlines()[-1])


def time_prefills(
    args, models: dict, shapes, device, generator, options, results: dict, report: list
) -> None:
    """The prefill of each shape, every model round-robin (compiled with ``--compile-prefill``)."""
    vocab = models["dense"].config.vocab_size
    for batch, seq_len in shapes:
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
        work = {name: prefill_flops(model, ids) for name, model in models.items()}
        # with --compile-prefill each model is compiled for this shape (the warm-up round compiles)
        runners = {
            n: torch.compile(m, dynamic=False) if args.compile_prefill else m for n, m in models.items()
        }

        def run(name, model, ids=ids):
            prefill(model, ids)
            sync(device)

        times = round_robin(runners, run, args.repeats)
        results["prefill"][f"{batch}x{seq_len}"] = {"minor_faults": times["faults"]}
        print(
            f"minor page faults per run: { {n: max(f) for n, f in times['faults'].items()} } (max)",
            flush=True,
        )
        for clock in ("wall", "cpu"):
            rows = summarise(times[clock], work, batch * seq_len)
            results["prefill"][f"{batch}x{seq_len}"][clock] = rows
            how = f"torch.compile (inductor: {options})" if args.compile_prefill else "eager"
            title = f"prefill {batch} x {seq_len}, {how}, tokens/s, {clock} time, {args.repeats} rounds"
            report.append(table(title, rows, "tokens/s"))
            print(report[-1], flush=True)


def time_decode(args, models: dict, device, generator, options, results: dict, report: list) -> None:
    """Batch-1 decode, every model round-robin, after checking its compiled tokens against eager ones."""
    vocab = models["dense"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=generator).to(device)
    decoders = {
        name: Decoder(model, args.prompt_len, args.decode_tokens, device, not args.no_compile)
        for name, model in models.items()
    }
    work = {name: decoder.flops(prompt) for name, decoder in decoders.items()}
    agree = {name: decoder.agreement(prompt) for name, decoder in decoders.items()}  # (compiles each)
    for name, equal in agree.items():
        if equal < args.decode_tokens:
            logger.warning("%s: compiled decode left the eager tokens at step %d", name, equal)
    decode_times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}

    def run_decode(name, decoder):
        wall, cpu = decoder.run(prompt)  # the steps only, not the prompt
        decode_times["wall"].setdefault(name, []).append(wall)
        decode_times["cpu"].setdefault(name, []).append(cpu)

    round_robin(decoders, run_decode, args.repeats)
    how = "static cache + torch.compile" if not args.no_compile else "static cache, eager"
    how += f" (inductor: {options})" if options and not args.no_compile else ""
    results["decode"] = {"tokens_equal_to_eager": agree}
    report.append(f"greedy tokens equal to eager decoding (of {args.decode_tokens}): {agree}")
    print(report[-1], flush=True)
    for clock in ("wall", "cpu"):
        timed = {name: values[1:] for name, values in decode_times[clock].items()}  # [0]: warm-up
        rows = summarise(timed, work, args.decode_tokens)
        results["decode"][clock] = rows
        title = (
            f"decode batch 1, {args.decode_tokens} tokens after {args.prompt_len}, {how}, tokens/s, "
            f"{clock} time, {args.repeats} rounds"
        )
        report.append(table(title, rows, "tokens/s"))
        print(report[-1], flush=True)


def measure_memory(args, models: dict, paths: dict, shape, results: dict, report: list) -> None:
    """Peak memory of a fresh process per model against the target: dense peak - weights saved + 5%.

    On CPU the peak is the process's RSS (``VmHWM``); on CUDA it is the device's peak allocation, where the
    weights and activations live (the RSS is recorded too)."""
    vocab = models["dense"].config.vocab_size
    paths = {
        name: path for name, path in paths.items() if not name.endswith((":plain", ":fused"))
    }  # same files
    memory = {name: peak_memory(path, shape, args, vocab) for name, path in paths.items()}
    key = "peak_device_bytes" if args.device.startswith("cuda") else "peak_rss_bytes"
    what = "peak CUDA allocation" if key == "peak_device_bytes" else "peak RSS (VmHWM)"
    dense_peak = memory["dense"][key]
    dense_weights = parameter_bytes(models["dense"])
    lines = [
        f"\n{what} of a fresh process: from_pretrained + one {shape[0]} x {shape[1]} prefill\n",
        f"| model | weights MiB | {what} MiB | allowed: dense peak - weights saved + 5% | met |",
        "|---|---|---|---|---|",
    ]
    for name, row in memory.items():
        row["weights_bytes"] = parameter_bytes(models[name])
        row["allowed_bytes"] = dense_peak - (dense_weights - row["weights_bytes"]) + 0.05 * dense_peak
        row["met"] = row[key] <= row["allowed_bytes"]
        lines.append(
            f"| {name} | {row['weights_bytes'] / 2**20:.0f} | {row[key] / 2**20:.0f} | "
            f"{row['allowed_bytes'] / 2**20:.0f} | {'yes' if row['met'] else 'NO'} |"
        )
    results["memory"] = memory
    report.append("\n".join(lines))
    print(report[-1], flush=True)


def parse_args() -> tuple[argparse.Namespace, dict[str, object]]:
    """The command line, and the inductor settings it names (checked)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="dense source when --dense is not given")
    parser.add_argument("--dense", default=None, help="dense checkpoint directory")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="--dense holds only a config and a tokenizer: draw the weights at random (seeded); speed does not "
        "depend on them, perplexity and the decoded tokens do",
    )
    parser.add_argument(
        "--slice-device", default=None, help="where slicing computes its layers (default: --device)"
    )
    parser.add_argument(
        "--checkpoints",
        nargs="*",
        default=None,
        help="sliced checkpoint dirs, or NAME=DIR (skip slicing); NAME:plain=DIR runs a plugin model unfused",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["layer", "global"], choices=["layer", "global", "native"]
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.20, 0.25, 0.30])
    parser.add_argument(
        "--correction",
        default="none",
        choices=["none", "ridge"],
        help="output correction when slicing here: shapes and speed do not depend on it, slicing time does",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--shapes", nargs="+", default=["8x512", "1x1024", "8x256"], help="prefill BATCHxSEQ")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument(
        "--no-prefill", action="store_true", help="skip the prefill timings (memory still runs)"
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="decode eagerly (still with a static cache)"
    )
    parser.add_argument(
        "--compile-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="torch._inductor.config settings for the decode compile, set process-wide for every model, e.g. "
        "freezing=True max_autotune=True max_autotune_gemm_backends=CPP,ATEN (CPU: weights prepacked as "
        "constants, GEMMs autotuned against C++ templates)",
    )
    parser.add_argument(
        "--compile-prefill",
        action="store_true",
        help="time prefills through torch.compile (one compile per shape; --compile-options apply) instead of eager",
    )
    parser.add_argument(
        "--with-plain",
        action="store_true",
        help="time each plugin-format model forced onto its plain path too (NAME:plain), as --checkpoints "
        "NAME:plain=DIR does",
    )
    parser.add_argument(
        "--with-fused",
        action="store_true",
        help='time each plugin-format model forced onto its fused path too (NAME:fused; eagerly, "auto" '
        "runs the plain path)",
    )
    parser.add_argument(
        "--allocator",
        choices=["steady", "default"],
        default="steady",
        help="steady (default): glibc keeps freed buffers in its heap (mallopt, as MALLOC_MMAP_THRESHOLD_ and "
        "MALLOC_TRIM_THRESHOLD_ would), so a forward's large buffers are not page-faulted back in on some "
        "rounds and not others; default: leave the allocator as the environment set it. Timings only: the "
        "peak-memory children always run the default allocator",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.random_weights and not args.dense:
        parser.error("--random-weights needs --dense DIR with the config and tokenizer to draw weights for")
    args.slice_device = args.slice_device or args.device
    try:
        options = compile_options(args.compile_options)
    except ValueError as exc:
        parser.error(str(exc))
    return args, options


def main() -> None:
    args, options = parse_args()
    allocator = steady_allocator() if args.allocator == "steady" else {}
    set_inductor(options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels ATen picked (AVX2, AVX512, ...)
        # glibc's allocator settings change how often large buffers are page-faulted back in (BENCHMARKS.md)
        "environment": {key: value for key, value in os.environ.items() if key.startswith(ENV_RECORDED)},
        "allocator": {"mode": args.allocator, "mallopt": allocator},
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": args.dtype,
        "load_average_at_start": os.getloadavg(),
    }
    paths = prepare_models(args, Path(tempfile.mkdtemp(dir=args.workdir, prefix="inference-speed-")))
    plugin = [name for name, path in paths.items() if "sparsity" in _slicing(path)]
    for suffix in [":plain"] * args.with_plain + [":fused"] * args.with_fused:  # each plugin model forced too
        paths.update({f"{name}{suffix}": paths[name] for name in plugin})
    models = {name: load(path, name, dtype, device) for name, path in paths.items()}
    generator = torch.Generator().manual_seed(0)
    results: dict = {"machine": machine, "args": vars(args), "prefill": {}, "decode": None, "memory": None}
    report = [f"machine: {machine}", f"models: { {n: str(p) for n, p in paths.items()} }"]

    # the results are written after each phase: a run stopped by a time limit keeps what it measured
    if not args.no_prefill:
        time_prefills(args, models, shapes, device, generator, options, results, report)
        write_results(args, device, results)
    if not args.no_decode:
        time_decode(args, models, device, generator, options, results, report)
        write_results(args, device, results)
    if not args.no_memory:
        measure_memory(args, models, paths, shapes[0], results, report)

    machine["load_average_at_end"] = os.getloadavg()
    print(
        f"\nload average at start {machine['load_average_at_start']}, at end {machine['load_average_at_end']}"
    )
    write_results(args, device, results)


# glibc's mallopt parameters: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (malloc.h)
_MALLOPT = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}
_STEADY_BYTES = 2**31 - 1  # the largest value mallopt's int takes: every buffer of these models is smaller


def steady_allocator(libc: object | None = None) -> dict[str, int]:
    """Keep freed buffers in glibc's heap, so repeated forwards reuse memory instead of faulting it back in.

    glibc serves buffers above its mmap threshold (at most 32 MiB when it adapts) by ``mmap`` and unmaps them on
    free, and trims the heap's top: on the Intel VM a forward took 0 to 440k minor page faults, round by round,
    which was the spread of the timings (BENCHMARKS.md). Returns the settings applied (``{}`` where the C library
    has no ``mallopt``, e.g. musl or macOS: nothing changes there). Raises ``RuntimeError`` if glibc refuses one.
    """
    if libc is None:
        if platform.libc_ver()[0] != "glibc":
            return {}
        libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return {}
    applied = {}
    for name, param in _MALLOPT.items():
        if mallopt(param, _STEADY_BYTES) != 1:
            raise RuntimeError(
                f"glibc refused mallopt({name}, {_STEADY_BYTES}); rerun with --allocator default"
            )
        applied[name] = _STEADY_BYTES
    return applied


def cpu_model() -> str:
    """The CPU's model name: the same VM image has run on different CPUs, whose kernels time differently."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def write_results(args, device: torch.device, results: dict) -> None:
    """Store ``results`` under ``DEVICE-DTYPE`` in ``--json`` (other machines' entries are kept)."""
    if not args.json:
        return
    out = Path(args.json)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing[f"{device.type}-{args.dtype}"] = results
    out.write_text(json.dumps(existing, indent=2) + "\n")


if __name__ == "__main__":
    main()
