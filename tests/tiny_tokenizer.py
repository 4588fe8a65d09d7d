"""A character-level tokenizer for the tiny test models, built in-process (no downloads).

Printable ASCII plus newline and four special tokens: 100 ids, inside the tiny models' vocabulary of 128.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ``<s>`` is BOS, ``</s>`` EOS, ``<pad>`` padding."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for char in ["\n", *map(chr, range(32, 127))]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
