"""``hf-slicegpt generate MODEL --prompt TEXT``: try a (sliced) model by letting it write."""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

from ..workflows.loading import context_length, resolve_device
from ._common import add_model_options, add_parser, positive_int

logger = logging.getLogger("hf_slicegpt.cli")


def check_sampling(
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float | None = None,
) -> None:
    """Refuse sampling settings outside their range before the model is loaded, naming the value and range."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not number(temperature) or temperature < 0:
        raise ValueError(
            f"--temperature must be a finite number >= 0 (0 = greedy, > 0 samples), got {temperature!r}"
        )
    if not number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1 = off), got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"--top-k must be an integer >= 0 (0 = off), got {top_k!r}")
    if repetition_penalty is not None and (not number(repetition_penalty) or repetition_penalty <= 0):
        raise ValueError(
            f"--repetition-penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}"
        )


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    chat: bool = False,
    seed: int = 0,
) -> str:
    """The continuation of ``prompt`` (without the prompt). Greedy unless ``temperature > 0``.

    ``max_new_tokens`` is capped so that prompt plus continuation fit the model's context (beyond it a model
    only degrades, slowly: a million tokens ran for minutes).
    """
    import torch

    check_sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
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
    prompt_tokens = inputs["input_ids"].shape[1]
    limit = context_length(model.config)
    if limit is not None and prompt_tokens >= limit:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens, which fills the model's context of {limit}; shorten it"
        )
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        logger.warning(
            "--max-new-tokens %d would run past the model's context of %d tokens (prompt: %d); generating %d",
            max_new_tokens,
            limit,
            prompt_tokens,
            limit - prompt_tokens,
        )
        max_new_tokens = limit - prompt_tokens
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
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
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (with --temperature > 0)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample from the K likeliest tokens; 0 = off (with --temperature > 0)",
    )
    parser.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.2 against loops")
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    add_model_options(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from ..workflows.loading import load_model_and_tokenizer

    check_sampling(  # before the model is loaded: a typo costs a second
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        dtype=args.dtype,
        device=resolve_device(args.device),
        trust_remote_code=args.trust_remote_code,
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
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        chat=args.chat,
        seed=args.seed,
    )
    print(text if args.chat else args.prompt + text)
    return 0
