"""``hf-slicegpt export DIR --format gguf --output FILE``: a sliced model for runtimes beyond transformers.

DIR is a native export (``slice --rotation global --export native``) or a global-rotation sliced checkpoint.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_parser, human_bytes


def register(subparsers: Any) -> None:
    parser = add_parser(
        subparsers,
        "export",
        help="write a global-rotation sliced model as a GGUF file for llama.cpp",
    )
    parser.add_argument(
        "directory",
        metavar="DIR",
        help="a native export (slice --rotation global --export native) or a global-rotation sliced checkpoint",
    )
    parser.add_argument("--format", choices=["gguf"], default="gguf", help="the output format")
    parser.add_argument("--output", "-o", metavar="FILE", required=True, help="the .gguf file to write")
    parser.add_argument(
        "--dtype",
        choices=["f32", "f16", "q8_0"],
        default="f16",
        help="weight type: f32, f16, or q8_0 (8-bit blocks of 32; rows not a multiple of 32 wide stay f16)",
    )
    parser.add_argument(
        "--pre-tokenizer",
        metavar="NAME",
        default=None,
        help="llama.cpp's pre-tokenizer name (default: read off the tokenizer, e.g. gpt-2 or smollm)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from ..checkpoint.gguf_export import export_gguf

    path = export_gguf(
        args.directory, args.output, dtype=args.dtype, pre=args.pre_tokenizer, overwrite=args.overwrite
    )
    print(f"Wrote {path} ({args.dtype}, {human_bytes(path.stat().st_size)})")
    return 0
