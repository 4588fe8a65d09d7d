"""Calibration and evaluation text sources -> token tensors.

A *source* is a string naming where text comes from:

- a preset, loaded from the Hugging Face Hub the way the SliceGPT reference code did:
  ``wikitext2``, ``ptb``, ``c4``, ``alpaca``;
- ``pydocs``: the Python documentation that ships with CPython (``pydoc_data.topics``, about 465k
  characters). It needs no network, which makes it the offline default;
- a local ``.txt`` file, a directory of ``.txt`` files, or a ``.jsonl`` / ``.json`` / ``.parquet`` file;
- any other Hugging Face Hub dataset id (``"org/name"``), with ``text_column``, ``split``, ``subset``.

Calibration and evaluation text never overlap. Presets use the dataset's own splits (alpaca, which
has only ``train``, is split 90/10 by rows). Everything else without an explicit ``split`` holds out
the last 10% of its characters for evaluation, cut at a paragraph break (see :func:`load_text`).

The text is tokenized once, without special tokens, and cut into non-overlapping windows.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from datasets import load_dataset
from datasets.exceptions import DatasetsError
from tqdm.auto import tqdm

from ..errors import SliceGPTError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "DataSourceError",
    "HELD_OUT_FRACTION",
    "PRESETS",
    "PYDOCS",
    "calibration_tokens",
    "evaluation_tokens",
    "load_text",
    "mix_counts",
    "mixed_calibration_tokens",
    "tokenize_text",
    "windows",
]

Purpose = Literal["calibration", "evaluation"]

PYDOCS = "pydocs"
"""Source name of the offline text that ships with CPython."""

HELD_OUT_FRACTION = 0.1
"""Share of a single-split source kept for evaluation only (the tail of the text)."""

JOINER = "\n\n"
"""Documents, rows and files are joined with a blank line, as in the SliceGPT reference."""

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_OFFLINE_HINT = "offline? use source 'pydocs' (ships with Python) or a local .txt/.jsonl/.json/.parquet path"

# Characters per tokenizer call. Cuts fall where the pre-tokenizer splits anyway (see _chunk_text).
_CHUNK_CHARS = 1 << 16
_CHUNKS_PER_CALL = 16


class DataSourceError(SliceGPTError):
    """A text source cannot be found, loaded or does not hold enough text."""


@dataclass(frozen=True)
class HubPreset:
    """How the SliceGPT reference loaded one of its datasets from the Hub."""

    path: str
    name: str | None
    text_column: str
    splits: dict[str, str]  # purpose -> split
    data_files: dict[str, str] | None = None  # split -> file inside the dataset repo
    max_rows: dict[str, int] = field(default_factory=dict)  # split -> fixed-seed row subsample
    row_hold_out: bool = False  # the dataset has one split: hold out HELD_OUT_FRACTION of its rows


PRESETS: dict[str, HubPreset] = {
    "wikitext2": HubPreset(
        "wikitext", "wikitext-2-raw-v1", "text", {"calibration": "train", "evaluation": "test"}
    ),
    "ptb": HubPreset(
        "ptb_text_only", "penn_treebank", "sentence", {"calibration": "train", "evaluation": "test"}
    ),
    # The reference keeps 5000 train / 500 validation documents of the first shard: the shard
    # is far larger than wikitext2 and tokenizing it all would take minutes for no gain.
    "c4": HubPreset(
        "allenai/c4",
        None,
        "text",
        {"calibration": "train", "evaluation": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        max_rows={"train": 5000, "validation": 500},
    ),
    "alpaca": HubPreset(
        "tatsu-lab/alpaca", None, "text", {"calibration": "train", "evaluation": "train"}, row_hold_out=True
    ),
}

_ROW_SEED = 0  # fixed: row subsets must not move with the calibration seed


# --------------------------------------------------------------------------------------------
# Raw text
# --------------------------------------------------------------------------------------------


def load_text(
    source: str,
    *,
    purpose: Literal["calibration", "evaluation"],
    text_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> str:
    """Resolve ``source`` to the raw text used for ``purpose``.

    Resolution order: ``pydocs``, a preset name (case-insensitive), an existing local path,
    a string that looks like a path (error: it does not exist), else a Hub dataset id.

    Hold-out rule (why: calibrating on the evaluation text would flatter the sliced model):

    - presets use their calibration/evaluation splits (``alpaca``: a fixed 90/10 row split);
    - a Hub dataset without ``split`` calibrates on ``train`` and evaluates on ``test`` or
      ``validation``; if it has a single split, the rule below applies to it;
    - ``pydocs``, local files and single-split Hub datasets keep the last 10% of the joined
      text for evaluation. The cut is the first boundary at or after 90% of the characters:
      a topic boundary for ``pydocs``; a blank line (every file/row boundary is one), else a
      line break, else a space for the rest. Calibration text is everything before the cut,
      minus any paragraph that also occurs in the held-out part.
    - An explicit ``split`` disables the hold-out: the whole split is used for either purpose.
      For ``.txt`` sources the only split is ``"all"``; ``pydocs`` ignores ``split``.

    Args:
        source: preset, ``pydocs``, local path or Hub dataset id.
        purpose: ``"calibration"`` or ``"evaluation"``.
        text_column: column holding the text (default: the preset's, else ``"text"``).
        split: dataset split (``datasets`` slicing syntax works, e.g. ``"train[:10%]"``).
        subset: dataset configuration name on the Hub.
    """
    if purpose not in ("calibration", "evaluation"):
        raise ValueError(f"purpose must be 'calibration' or 'evaluation', got {purpose!r}")
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"source must be a non-empty string, got {source!r}; try {PYDOCS!r}")
    key = source.strip().lower()
    if key == PYDOCS:
        text = _load_pydocs(purpose, text_column=text_column, split=split, subset=subset)
    elif key in PRESETS:
        text = _load_preset(key, purpose, text_column=text_column, split=split, subset=subset)
    else:
        path = Path(source).expanduser()
        if path.exists():
            text = _load_local(path, purpose, text_column=text_column, split=split, subset=subset)
        elif _looks_like_path(source):
            raise DataSourceError(
                f"local path {source!r} does not exist; pass an existing .txt file, directory of "
                f".txt files, .jsonl/.json/.parquet file, or a preset ({', '.join(PRESETS)}, {PYDOCS})"
            )
        else:
            text = _load_hub(source, purpose, text_column=text_column, split=split, subset=subset)
    if not text.strip():
        raise DataSourceError(
            f"source {source!r} gave no {purpose} text; check text_column/split or use another source"
        )
    logger.info("Loaded %d characters of %s text from %r", len(text), purpose, source)
    return text


def _looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a Hub id."""
    return source.startswith((".", "/", "~", "\\")) or Path(source).suffix.lower() in LOCAL_SUFFIXES


def _held_out_cut(text: str, starts: Sequence[int] = ()) -> int:
    """Offset where the evaluation tail of ``text`` begins (see :func:`load_text`)."""
    n = len(text)
    target = math.ceil(n * (1.0 - HELD_OUT_FRACTION))
    # A boundary far past the target would leave almost nothing to evaluate: fall through to a
    # finer kind of boundary once less than half the intended tail would remain.
    limit = n - n * HELD_OUT_FRACTION / 2
    for start in starts:
        if target <= start <= limit:
            return start
    for pattern in (r"\n[ \t]*\n\s*", r"\n\s*", r"\s+"):
        match = re.compile(pattern).search(text, target)
        if match is not None and match.end() <= limit:
            return match.end()
    return target


def _split_held_out(text: str, purpose: Purpose, starts: Sequence[int] = ()) -> str:
    """The part of ``text`` for ``purpose``: the head for calibration, the tail for evaluation.

    The head also loses every paragraph that occurs verbatim in the tail: sources repeat
    themselves (pydoc's ``compound`` topic contains the ``while`` topic), and a repeated
    paragraph would leak evaluation text into calibration.
    """
    cut = _held_out_cut(text, starts)
    tail = text[cut:]
    if purpose == "evaluation":
        return tail
    held = {p.strip() for p in tail.split(JOINER)} - {""}
    head = text[:cut].rstrip().split(JOINER)
    kept = [p for p in head if p.strip() not in held]
    if len(kept) < len(head):
        logger.info(
            "Dropped %d calibration paragraph(s) repeated in the held-out text", len(head) - len(kept)
        )
    return JOINER.join(kept)


def _load_pydocs(purpose: Purpose, *, text_column: str | None, split: str | None, subset: str | None) -> str:
    """The CPython topic help, with a fixed evaluation tail that calibration never sees."""
    ignored = {k: v for k, v in (("text_column", text_column), ("split", split), ("subset", subset)) if v}
    if ignored:
        logger.warning("Source %r has a fixed hold-out; ignoring %s", PYDOCS, ignored)
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise DataSourceError(
            f"source {PYDOCS!r} needs the standard module pydoc_data, missing from this Python; "
            "pass a local .txt path instead"
        ) from exc
    parts = [topics[key] for key in sorted(topics)]
    starts, offset = [], 0
    for part in parts:
        starts.append(offset)
        offset += len(part) + len(JOINER)
    return _split_held_out(JOINER.join(parts), purpose, starts[1:])


def _texts_from_column(dataset: Any, column: str, where: str) -> list[str]:
    columns = list(getattr(dataset, "column_names", None) or [])
    if column not in columns:
        raise DataSourceError(
            f"{where} has no column {column!r}; available columns: {columns}. Pass text_column=<one of them>"
        )
    texts = [t for t in dataset[column] if t is not None]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DataSourceError(
            f"column {column!r} of {where} holds {type(bad).__name__} values, not text; "
            f"pass text_column=<a text column of {columns}>"
        )
    return texts


def _load_local(
    path: Path, purpose: Purpose, *, text_column: str | None, split: str | None, subset: str | None
) -> str:
    if not path.is_dir() and not path.is_file():  # reading a FIFO or a device would block or never end
        raise DataSourceError(
            f"{str(path)!r} is neither a regular file nor a directory (a FIFO, socket or device?); pass a "
            ".txt/.jsonl/.json/.parquet file or a directory of .txt files"
        )
    if subset:
        logger.warning("subset=%r has no meaning for local path %s; ignoring it", subset, path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".txt":
        if split not in (None, "all"):
            raise DataSourceError(
                f"split={split!r} does not apply to text files ({path}); pass split='all' to use the "
                "whole text for both purposes, or nothing for the 90/10 hold-out"
            )
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
            if not files:
                raise DataSourceError(f"directory {str(path)!r} holds no .txt files; add some or pass a file")
        else:
            files = [path]
        text = JOINER.join(_read_utf8(p) for p in files)
        logger.info("Read %d text file(s) from %s", len(files), path)
    elif suffix in _DATASETS_BUILDERS:
        column = text_column or "text"
        try:
            dataset = load_dataset(
                _DATASETS_BUILDERS[suffix],
                data_files=str(path),
                split=split if split not in (None, "all") else "train",
            )
        except (OSError, DatasetsError, ValueError) as exc:
            raise DataSourceError(
                f"could not read {str(path)!r} ({type(exc).__name__}: {_one_line(exc)}); "
                f"check the file is valid {suffix[1:]}"
            ) from exc
        text = JOINER.join(_texts_from_column(dataset, column, f"file {str(path)!r}"))
    else:
        raise DataSourceError(
            f"unsupported file type {suffix or '(none)'!r} for {str(path)!r}; "
            f"use one of {', '.join(LOCAL_SUFFIXES)} or a directory of .txt files"
        )
    return _split_held_out(text, purpose) if split is None else text


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"file {str(path)!r} is not UTF-8 text ({exc}); re-save it as UTF-8") from exc


def _one_line(exc: BaseException) -> str:
    """The message, with the first cause's when a wrapper says only that something failed (``datasets``'
    "An error occurred while generating the dataset" over the JSON parse error that says where)."""
    text = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return text[:300]


def _hub_load(path: str, name: str | None, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with network failures turned into one actionable error."""
    try:
        return load_dataset(path, name=name, **kwargs)
    except (OSError, DatasetsError) as exc:  # ConnectionError, offline mode, not found, HTTP errors
        raise DataSourceError(
            f"could not load dataset {path!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {_one_line(exc)}); {_OFFLINE_HINT}"
        ) from exc
    except ValueError as exc:  # e.g. an unknown split or config name
        raise DataSourceError(f"could not load dataset {path!r}: {_one_line(exc)}") from exc


def _fixed_subset(n_rows: int, keep: int) -> list[int]:
    """Sorted row indices of a fixed-seed random subset: the same rows on every run."""
    generator = torch.Generator().manual_seed(_ROW_SEED)
    return sorted(torch.randperm(n_rows, generator=generator)[:keep].tolist())


def _load_preset(
    key: str, purpose: Purpose, *, text_column: str | None, split: str | None, subset: str | None
) -> str:
    preset = PRESETS[key]
    column = text_column or preset.text_column
    ds_split = split or preset.splits[purpose]
    kwargs: dict[str, Any] = {"split": ds_split}
    if preset.data_files is not None:
        base = re.split(r"[\[+]", ds_split, maxsplit=1)[0]
        if base not in preset.data_files:
            raise DataSourceError(
                f"preset {key!r} has no split {base!r}; use one of {sorted(preset.data_files)}"
            )
        kwargs["data_files"] = {base: preset.data_files[base]}
    dataset = _hub_load(preset.path, subset or preset.name, **kwargs)
    if split is None and ds_split in preset.max_rows and len(dataset) > preset.max_rows[ds_split]:
        dataset = dataset.select(_fixed_subset(len(dataset), preset.max_rows[ds_split]))
    texts = _texts_from_column(dataset, column, f"dataset {preset.path!r} split {ds_split!r}")
    if split is None and preset.row_hold_out:
        held_out = set(_fixed_subset(len(texts), round(len(texts) * HELD_OUT_FRACTION)))
        want_held_out = purpose == "evaluation"
        texts = [t for i, t in enumerate(texts) if (i in held_out) == want_held_out]
    return JOINER.join(texts)


def _load_hub(
    source: str, purpose: Purpose, *, text_column: str | None, split: str | None, subset: str | None
) -> str:
    column = text_column or "text"
    if split is not None:
        dataset = _hub_load(source, subset, split=split)
        return JOINER.join(_texts_from_column(dataset, column, f"dataset {source!r} split {split!r}"))
    splits = _hub_load(source, subset)
    names = list(splits.keys())
    if not names:
        raise DataSourceError(f"dataset {source!r} has no splits; pass another source")
    train = "train" if "train" in names else names[0]
    held = next((s for s in ("test", "validation", "valid", "dev") if s in names and s != train), None)
    if held is None:
        text = JOINER.join(_texts_from_column(splits[train], column, f"dataset {source!r} split {train!r}"))
        return _split_held_out(text, purpose)
    chosen = train if purpose == "calibration" else held
    logger.info("Using split %r of %r for %s", chosen, source, purpose)
    return JOINER.join(_texts_from_column(splits[chosen], column, f"dataset {source!r} split {chosen!r}"))


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

# Cut long text where byte-level BPE / tiktoken-style pre-tokenizers split anyway: between a
# letter and a following newline (else space). Chunked tokenization then equals whole-text
# tokenization for those tokenizers; for others it differs at most at a handful of chunk edges.
_CUT_PATTERNS = (re.compile(r"(?<=[^\W\d_])\n"), re.compile(r"(?<=[^\W\d_]) "))


def _chunk_text(text: str, size: int) -> list[str]:
    chunks, start, n = [], 0, len(text)
    while start < n:
        end = start + size
        if end < n:
            cut = None
            for pattern in _CUT_PATTERNS:
                for match in pattern.finditer(text, start + size // 2, end):
                    cut = match.start()
                if cut is not None:
                    break
            end = cut if cut is not None else end
        else:
            end = n
        chunks.append(text[start:end])
        start = end
    return chunks


def tokenize_text(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> torch.LongTensor:
    """Token ids of ``text`` as one 1-D tensor, without BOS/EOS (the text is one long stream).

    Long text goes through the tokenizer in chunks, with a progress bar; with ``max_tokens``,
    tokenization stops once that many tokens exist (the result is not truncated here).
    """
    chunks = _chunk_text(text, _CHUNK_CHARS)
    ids: list[int] = []
    with tqdm(
        total=len(chunks), desc="Tokenizing", unit="chunk", disable=not show_progress or len(chunks) < 2
    ) as bar:
        for i in range(0, len(chunks), _CHUNKS_PER_CALL):
            batch = chunks[i : i + _CHUNKS_PER_CALL]
            encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
            for chunk_ids in encoded["input_ids"]:
                ids.extend(chunk_ids)
            bar.update(len(batch))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    return torch.tensor(ids, dtype=torch.long)


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(
            f"seq_len must be an integer >= 2 (a window predicts seq_len - 1 tokens), got {seq_len!r}"
        )


def _check_num_samples(num_samples: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")


def windows(
    token_ids: torch.LongTensor, seq_len: int, num_samples: int | None, seed: int | None
) -> torch.LongTensor:
    """Cut a 1-D token stream into non-overlapping ``seq_len`` windows, shape ``(n, seq_len)``.

    ``num_samples=None`` returns every window in order (evaluation). Otherwise ``seed`` picks
    which windows through a fixed permutation (``seed=None``: the first ``num_samples``); the
    chosen windows are returned in text order. Windows never overlap, so no calibration token
    is counted twice, unlike the reference's random offsets.
    """
    _check_seq_len(seq_len)
    if num_samples is not None:
        _check_num_samples(num_samples)
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}; flatten it first")
    n_tokens = token_ids.numel()
    n_windows = n_tokens // seq_len
    needed = seq_len * (num_samples or 1)
    if n_windows < (num_samples or 1):
        raise DataSourceError(
            f"not enough text: {needed} tokens needed ({num_samples or 1} x {seq_len}) but the source "
            f"has {n_tokens}; use fewer samples, a shorter seq-len, or a larger source"
        )
    grid = token_ids[: n_windows * seq_len].long().view(n_windows, seq_len)
    if num_samples is None:
        return grid.clone()
    if seed is None:
        chosen = torch.arange(num_samples)
    else:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n_windows, generator=generator)[:num_samples].sort().values
    return grid[chosen].clone()


def calibration_tokens(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    *,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 42,
    text_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> torch.LongTensor:
    """``(num_samples, seq_len)`` calibration windows drawn from the calibration text of ``source``.

    The seed chooses which non-overlapping windows are used, so runs are reproducible.
    """
    _check_num_samples(num_samples)
    _check_seq_len(seq_len)
    text = load_text(source, purpose="calibration", text_column=text_column, split=split, subset=subset)
    ids = tokenize_text(tokenizer, text)
    logger.info(
        "Calibration source %r: %d tokens, %d windows of %d",
        source,
        ids.numel(),
        ids.numel() // seq_len,
        seq_len,
    )
    return windows(ids, seq_len, num_samples, seed)


def mix_counts(num_samples: int, mix: Sequence[tuple[str, float]]) -> list[int]:
    """Windows per source for ``mix`` (``(source, fraction)`` pairs) out of ``num_samples``; the main source
    first. Each mixed source gets at least one window, the main source the rest (at least one)."""
    _check_num_samples(num_samples)
    counts = []
    for source, fraction in mix:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise DataSourceError(
                f"calibration mix fraction for {source!r} must be in (0, 1), got {fraction!r}; e.g. 0.125 "
                "gives that source one window in eight"
            )
        counts.append(max(1, round(fraction * num_samples)))
    main = num_samples - sum(counts)
    if main < 1:
        raise DataSourceError(
            f"the calibration mix {[f for _, f in mix]} leaves no windows of {num_samples} for the main source; "
            "use smaller fractions (their sum must stay below 1) or more samples"
        )
    return [main, *counts]


def mixed_calibration_tokens(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    mix: Sequence[tuple[str, float]],
    *,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 42,
    text_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> torch.LongTensor:
    """Calibration windows from ``source`` plus a fixed share from each ``(source, fraction)`` of ``mix``.

    SliceGPT keeps the directions its calibration text uses, so a sliced model is good on that kind of text
    and can be much worse on others. An eighth of the windows from another kind of text keeps most of it
    (BENCHMARKS.md, "Robustness"). ``text_column``/``split``/``subset`` apply to ``source`` only; the mixed
    sources are read with their defaults (local text files, presets, ``pydocs``).
    """
    counts = mix_counts(num_samples, mix)
    parts = [
        calibration_tokens(
            tokenizer,
            source,
            num_samples=counts[0],
            seq_len=seq_len,
            seed=seed,
            text_column=text_column,
            split=split,
            subset=subset,
        )
    ]
    for (extra, _), count in zip(mix, counts[1:]):
        parts.append(calibration_tokens(tokenizer, extra, num_samples=count, seq_len=seq_len, seed=seed))
    logger.info(
        "Calibration mix: %s",
        ", ".join(f"{n} x {s!r}" for n, s in zip(counts, [source, *(m[0] for m in mix)])),
    )
    return torch.cat(parts)


def evaluation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    *,
    seq_len: int = 2048,
    max_tokens: int | None = None,
    text_column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> torch.LongTensor:
    """All non-overlapping ``seq_len`` windows of the evaluation text of ``source``, in order.

    ``max_tokens`` caps the tokens used (rounded down to whole windows), to bound evaluation time.
    """
    _check_seq_len(seq_len)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < seq_len
    ):
        raise ValueError(f"max_tokens must be an integer >= seq_len ({seq_len}), got {max_tokens!r}")
    text = load_text(source, purpose="evaluation", text_column=text_column, split=split, subset=subset)
    ids = tokenize_text(tokenizer, text, max_tokens=max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    result = windows(ids, seq_len, None, None)
    logger.info("Evaluation source %r: %d windows of %d tokens", source, result.shape[0], seq_len)
    return result
