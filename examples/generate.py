"""Generate text with a sliced checkpoint, with hf-slicegpt installed or without it.

    python examples/generate.py outputs/example-sliced --prompt "A Python list is"
    python examples/generate.py outputs/example-sliced --remote-code   # no hf_slicegpt import at all

A sliced checkpoint carries its modeling code, so ``trust_remote_code=True`` loads it on a machine that only has
transformers. With hf_slicegpt imported, the architecture is registered and no remote code is needed.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", nargs="?", default="outputs/example-sliced", help="a sliced checkpoint")
    parser.add_argument("--prompt", default="A Python list is")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--remote-code", action="store_true", help="load with trust_remote_code=True instead")
    args = parser.parse_args()

    if args.remote_code:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, trust_remote_code=True)
    else:
        import hf_slicegpt  # noqa: F401 - registers the sliced architecture with the Auto classes

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    print(f"loaded {type(model).__name__} (hf_slicegpt imported: {'hf_slicegpt' in sys.modules})")

    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            repetition_penalty=1.3,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    print(tokenizer.decode(output[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
