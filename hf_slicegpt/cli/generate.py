"""``hf-slicegpt generate MODEL --prompt TEXT``: try a (sliced) model by letting it write."""

from __future__ import annotations

import argparse
from typing import Any

from ..workflows.loading import resolve_device
from ._common import add_model_options, add_parser, positive_int


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float | None = None,
    chat: bool = False,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (without the prompt). Greedy unless ``temperature > 0``."""
    import torch

    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this one has none, drop --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty after tokenization; pass some text with --prompt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    if repetition_penalty is not None:
        options["repetition_penalty"] = repetition_penalty
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(**inputs, **options)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def register(subparsers: Any) -> None:
    parser = add_parser(subparsers, "generate", help="generate text from a prompt with a (sliced) model")
    parser.add_argument("model", metavar="MODEL", help="hub id, checkpoint directory, .gguf file or smollm2")
    parser.add_argument("--prompt", "-p", required=True, help="text to continue")
    parser.add_argument(
        "--max-new-tokens", metavar="N", type=positive_int, default=50, help="tokens to generate"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.2 against loops")
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    add_model_options(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from ..workflows.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=args.dtype, device=resolve_device(args.device)
    )
    if tokenizer is None:
        from ..checkpoint.validation import missing_tokenizer_error

        raise missing_tokenizer_error(args.model, "generation (to read the prompt)")
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        chat=args.chat,
        seed=args.seed,
    )
    print(text if args.chat else args.prompt + text)
    return 0
