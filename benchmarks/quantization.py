"""Quantization stacked on slicing: SmolLM2-135M dense / sliced (25%), each unquantised and int8 weight-only.

Quantised models are loaded the way a user would: ``from_pretrained(dir, quantization_config=...)`` on a saved
checkpoint, with transformers' ``TorchAoConfig(Int8WeightOnlyConfig())`` (torchao) or
``QuantoConfig(weights="int8")`` (optimum-quanto), both on CPU. Rows:

- dense, dense + int8;
- sliced (per-layer rotation, the paper's method: shortcut matrices ``attn_shortcut`` / ``mlp_shortcut``),
  + int8 with the shortcuts quantised too, + int8 with the shortcuts kept in fp32, + quanto int8;
- native (global rotation exported as a plain ``LlamaForCausalLM``, no shortcuts), + int8.

Perplexity is on the held-out pydocs tail (calibration never sees it); size is the bytes of the weights in
memory (a quantised tensor counts its int8 data and its scales), each matrix once.

torchao and optimum-quanto are binary / not pinned with the project, so they live outside the project venv:

    pip install --no-deps --target .venv-quant torchao==0.18.0 optimum-quanto==0.2.7 ninja==1.13.2
    PYTHONPATH=.venv-quant OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantization.py \
        --threads 1 --num-samples 32 --json benchmarks/results/quantization.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import hf_slicegpt
from hf_slicegpt.checkpoint.export import save_native
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logger = logging.getLogger("quantization")
# transformers matches these against parameter names ("model.layers.0.attn_shortcut.weight") from the start or as
# a regex: a bare "attn_shortcut" matches nothing. A list given replaces the default skips, so keep lm_head.
SHORTCUTS = ["lm_head", r".*\.attn_shortcut", r".*\.mlp_shortcut"]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantised, tensor-subclass) tensor holds: its inner tensors for torchao / quanto."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each (tied) matrix once."""
    unique = {id(p): p for p in model.parameters()}
    return sum(tensor_bytes(p.data if isinstance(p, torch.nn.Parameter) else p) for p in unique.values())


def quantization_config(name: str, skip: list[str] | None = None) -> Any:
    from transformers import QuantoConfig, TorchAoConfig

    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    if name == "quanto-int8":
        return QuantoConfig(weights="int8", modules_to_not_convert=skip)
    raise ValueError(name)


def quantized_linears(model: torch.nn.Module) -> tuple[int, int]:
    """(quantised, all) nn.Linear-like modules: a quantised one's weight is a tensor subclass."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantised = [m for m in linears if type(m.weight.data) is not torch.Tensor]
    return len(quantised), len(linears)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--work-dir", default="benchmarks/results/quantization-work", help="saved checkpoints"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    for package in ("torchao", "optimum.quanto"):
        if importlib.util.find_spec(package.split(".")[0]) is None:
            raise SystemExit(f"{package} is not importable: see this script's docstring for the install")
    from transformers import AutoModelForCausalLM

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    calibration = calibration_tokens(
        tokenizer, "pydocs", num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed
    )
    evaluation = evaluation_tokens(tokenizer, "pydocs", seq_len=args.seq_len)
    logger.info("calibration %s, evaluation %s", tuple(calibration.shape), tuple(evaluation.shape))

    dirs = {"dense": work / "dense", "sliced": work / "sliced", "native": work / "native"}
    model.save_pretrained(dirs["dense"])
    tokenizer.save_pretrained(dirs["dense"])
    for rotation in ("layer", "global"):
        target = dirs["sliced" if rotation == "layer" else "native"]
        dense, _ = load_model_and_tokenizer("smollm2", dtype="float32")
        start = time.perf_counter()
        sliced = hf_slicegpt.slice_model(
            dense, calibration, args.sparsity, rotation=rotation, show_progress=False
        )
        logger.info("sliced (%s) in %.0f s", rotation, time.perf_counter() - start)
        if rotation == "layer":
            sliced.save_pretrained(target)
            tokenizer.save_pretrained(target)
        else:
            save_native(sliced, target, tokenizer=tokenizer, overwrite=True)
        del sliced, dense

    variants = [
        ("dense", "dense", None, None),
        ("dense + torchao int8", "dense", "torchao-int8", None),
        ("sliced", "sliced", None, None),
        ("sliced + torchao int8 (shortcuts int8)", "sliced", "torchao-int8", None),
        ("sliced + torchao int8 (shortcuts fp32)", "sliced", "torchao-int8", SHORTCUTS),
        ("sliced + quanto int8 (shortcuts int8)", "sliced", "quanto-int8", None),
        ("native (global)", "native", None, None),
        ("native (global) + torchao int8", "native", "torchao-int8", None),
    ]
    rows = []
    for label, source, quant, skip in variants:
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if quant:
            kwargs["quantization_config"] = quantization_config(quant, skip)
        loaded = AutoModelForCausalLM.from_pretrained(dirs[source], **kwargs).eval()
        start = time.perf_counter()
        result = perplexity(loaded, evaluation, batch_size=args.eval_batch_size, show_progress=False)
        quantised, linears = quantized_linears(loaded)
        row = {
            "model": label,
            "source": source,
            "quantization": quant,
            "not_converted": skip,
            "perplexity": result.perplexity,
            "weight_bytes": weight_bytes(loaded),
            "quantised_linears": quantised,
            "linears": linears,
            "eval_s": time.perf_counter() - start,
        }
        rows.append(row)
        logger.info("%s: ppl %.3f, %.1f MB", label, row["perplexity"], row["weight_bytes"] / 1e6)
        del loaded

    base = {r["source"]: r for r in rows if r["quantization"] is None}
    print(
        f"\nSmolLM2-135M (fp32 from the Q4_1 GGUF), {args.sparsity:.0%} sliced, calibration pydocs "
        f"{args.num_samples} x {args.seq_len} (seed {args.seed}); held-out pydocs {evaluation.shape[0]} x "
        f"{args.seq_len} tokens\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}\n"
    )
    print("| model | held-out ppl | ppl / unquantised | weights (MB) | size / dense | linears quantised |")
    print("|---|---|---|---|---|---|")
    dense_bytes = base["dense"]["weight_bytes"]
    for r in rows:
        print(
            f"| {r['model']} | {r['perplexity']:.2f} | {r['perplexity'] / base[r['source']]['perplexity']:.4f} | "
            f"{r['weight_bytes'] / 1e6:.1f} | {r['weight_bytes'] / dense_bytes:.3f} | "
            f"{r['quantised_linears']}/{r['linears']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
