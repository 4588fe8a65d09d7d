"""Helpers for the CLI and examples tests: a tiny checkpoint with a real tokenizer, and running the CLI.

The tokenizer is a byte-level BPE trained in-process on the Python docs (no download); the model is a tiny
random LLaMA with tied embeddings, saved with ``save_pretrained`` so the CLI loads it like any checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import torch
from tiny import make_tiny
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 1024  # byte-level BPE: 256 bytes + specials + merges; fewer tokens means faster tests
PYDOCS_TEXT = "\n\n".join(topics[k] for k in sorted(topics))
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread for tiny in-process models (see ``cli_env``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PYDOCS_TEXT[:100_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def save_tiny_checkpoint(directory: Path, family: str = "llama_tied", **overrides) -> Path:
    """A tiny random ``family`` model plus tokenizer, saved like a hub checkpoint."""
    model = make_tiny(family, vocab_size=VOCAB, max_position_embeddings=256, **overrides)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_corpus(path: Path, chars: int = 60_000) -> Path:
    """English text for a local ``.txt`` source (the tail of the Python docs, generated at test time)."""
    path.write_text(PYDOCS_TEXT[-chars:], encoding="utf-8")
    return path


def cli_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_SLICEGPT_CACHE=str(tmp / "cache"),
        HF_MODULES_CACHE=str(tmp / "modules"),
        PYTHONUNBUFFERED="1",
        # Tiny models: one thread is fastest, and on a shared machine extra OpenMP threads spin-wait (7x slower).
        OMP_NUM_THREADS="1",
    )
    return env


def run_cli(*args: str, tmp: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``hf-slicegpt ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "hf_slicegpt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        env=cli_env(tmp),
    )
