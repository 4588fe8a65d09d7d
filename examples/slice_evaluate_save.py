"""Slice a model with the Python API, compare perplexity, save it, and reload it with plain transformers.

    python examples/slice_evaluate_save.py                 # SmolLM2-135M at 25%, calibrated on pydocs (offline)
    python examples/slice_evaluate_save.py --model path/to/checkpoint --sparsity 0.3 --output outputs/mine

Every step is one call: load, tokenize calibration and held-out text, slice, measure, save, reload.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

import hf_slicegpt  # registers the sliced architecture with AutoModelForCausalLM
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="hub id, checkpoint directory, .gguf, or smollm2")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--data", default="pydocs", help="calibration source; its held-out part is evaluated")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens to evaluate")
    parser.add_argument("--output", default="outputs/example-sliced")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    calibration = calibration_tokens(tokenizer, args.data, num_samples=args.num_samples, seq_len=args.seq_len)
    held_out = evaluation_tokens(tokenizer, args.data, seq_len=args.seq_len, max_tokens=args.eval_tokens)

    dense_params = sum(p.numel() for p in model.parameters())
    dense_ppl = perplexity(model, held_out, batch_size=8).perplexity

    # slice_model consumes the dense model (its layers are rotated in place), so measure it first.
    sliced = hf_slicegpt.slice_model(model, calibration, sparsity=args.sparsity)
    sliced_params = sum(p.numel() for p in sliced.parameters())
    sliced_ppl = perplexity(sliced, held_out, batch_size=8).perplexity
    print(
        f"parameters: {dense_params:,} dense -> {sliced_params:,} sliced ({sliced_params / dense_params:.1%})"
    )
    print(f"perplexity on held-out {args.data}: {dense_ppl:.3f} dense -> {sliced_ppl:.3f} sliced")
    for stats in sliced.slicing_stats[:3]:
        print(
            f"  {stats.name}: kept {stats.kept_width}/{stats.width} dims, {stats.explained_variance:.1%} of variance"
        )

    sliced.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)

    # Plain transformers loads it back (hf_slicegpt is imported, so the architecture is registered).
    reloaded = AutoModelForCausalLM.from_pretrained(args.output)
    with torch.inference_mode():
        same = torch.allclose(reloaded(held_out[:1]).logits, sliced(held_out[:1]).logits, atol=1e-4)
    print(f"saved to {args.output}; reloaded {type(reloaded).__name__}, logits identical: {same}")


if __name__ == "__main__":
    main()
