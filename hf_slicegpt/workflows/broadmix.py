"""A small built-in broad calibration mix: text every machine has offline, none of it committed here.

SliceGPT keeps the directions its calibration text uses; a model sliced on one kind of text can be much worse on
others (BENCHMARKS.md, "Robustness"). Blending a few windows of other kinds of text into any calibration set
keeps most of them. The kinds here are made or read on the spot, so nothing third-party is stored in the
project, and no evaluation source of ``benchmarks/`` is read (the prose kind can hold the same standard licences
as one; ``benchmarks/correction.py`` leaves such documents out):

- ``code``: the Python standard library's own source files (code, comments, docstrings), from this install;
- ``structured``: deterministic synthetic records (key/value lines, tables, dates, numbers with units, paths,
  e-mail-like identifiers, accented and Greek/Cyrillic words) from a generator of its own (not the one
  ``benchmarks/robustness.py`` evaluates on);
- ``prose``: the English that ships with the installed Python packages: each distribution's long description
  (its README) and its licence and notice files, read through ``importlib.metadata``; hf-slicegpt's own are
  left out, so that editing this project's README does not change what a default slice calibrates on.

Each kind is a list of documents; :func:`broad_texts` joins them up to a size cap and takes a ``keep`` filter,
so that a benchmark can leave out any document that shares text with what it evaluates on.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import sysconfig
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BROAD_KINDS = ("code", "structured", "prose")
# Share of the calibration windows taken from each kind (3 kinds x 1/16 = 3/16 of the windows in all).
BROAD_FRACTION = 1 / 16
_KIND_CHARS = 300_000
_PROSE_FILES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
_MIN_DOCUMENT_CHARS = 400
_PROSE_DOCUMENT_CHARS = 4_000
_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "config-")
# Distributions whose text is not calibration text: this project's own README and licence.
_OWN_DISTRIBUTIONS = ("hf-slicegpt",)


def stdlib_code() -> Iterator[str]:
    """The standard library's ``.py`` files (tests, GUIs and vendored code left out), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(_SKIP) for part in rel.split("/")):
            continue
        try:
            yield f"# {rel}\n{path.read_text(encoding='utf-8')}"
        except (OSError, UnicodeDecodeError):
            continue


def package_prose(seed: int = 0) -> Iterator[str]:
    """The installed distributions' long descriptions and licence/notice files, each cut at 4,000 characters
    (hf-slicegpt's own left out).

    The documents come in a seeded shuffle of their sorted order, so that any prefix of them spans many
    packages and both kinds of text (READMEs and legal English); exact repeats come once.
    """
    documents: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.replace("_", "-") in _OWN_DISTRIBUTIONS:
            continue
        documents[f"{name}/description"] = (
            dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        )
        for file in dist.files or []:
            if file.parts[0].endswith(".dist-info") and file.name.upper().startswith(_PROSE_FILES):
                try:
                    documents[f"{name}/{file}"] = file.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
    order = sorted(documents)
    random.Random(seed).shuffle(order)
    seen: set[str] = set()
    for key in order:
        text = documents[key].strip()[:_PROSE_DOCUMENT_CHARS]
        if len(text) >= _MIN_DOCUMENT_CHARS and text not in seen:
            seen.add(text)
            yield text


def structured_text(seed: int = 12345, records: int = 4000) -> str:
    """Deterministic structured and multilingual records (not prose, not code)."""
    rng = random.Random(seed)
    syllables = ["ka", "ri", "to", "mel", "san", "dor", "vi", "lun", "pe", "gra", "sho", "ne", "tri", "bo"]
    accented = "áéíóúàèìòùäëïöüâêîôûçñßøå"
    greek = "αβγδεζηθικλμνξοπρστυφχψω"
    cyrillic = "абвгдежзийклмнопрстуфхцчшщыэюя"
    units = ["ms", "kB", "MiB", "kg", "km/h", "°C", "%", "USD", "EUR", "px"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))

    def foreign() -> str:
        alphabet = rng.choice([accented + "abcdefghilmnoprstu", greek, cyrillic])
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9)))

    lines = []
    for i in range(records):
        kind = i % 6
        if kind == 0:
            lines.append(
                f"{word().capitalize()}_{rng.randint(0, 999)} = {rng.uniform(-50, 5000):.3f} {rng.choice(units)}"
            )
        elif kind == 1:
            cells = [
                word(),
                str(rng.randint(0, 10**5)),
                f"{rng.random():.2f}",
                rng.choice(["yes", "no", "n/a"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        elif kind == 2:
            lines.append(
                f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z "
                f"[{rng.choice(['INFO', 'WARN', 'ERROR', 'DEBUG'])}] {word()}: {word()} {word()} "
                f"0x{rng.getrandbits(32):08x}"
            )
        elif kind == 3:
            lines.append(
                f"{word()}.{word()}@{word()}.{rng.choice(['org', 'net', 'io', 'de', 'fr'])} /"
                f"{word()}/{word()}/{word()}.{rng.choice(['json', 'yaml', 'csv', 'log'])}"
            )
        elif kind == 4:
            lines.append(
                " ".join(foreign() for _ in range(rng.randint(3, 8))) + rng.choice([".", "?", "!", ";"])
            )
        else:
            n = rng.randint(2, 5)
            lines.append(
                "; ".join(f"{k + 1}) {word()} {rng.randint(1, 99)}x{rng.randint(1, 99)}" for k in range(n))
            )
    return "\n".join(lines)  # fmt: skip


def broad_documents() -> dict[str, Iterator[str]]:
    """The built-in kinds by name, each as a lazy sequence of documents."""
    return {"code": stdlib_code(), "structured": iter([structured_text()]), "prose": package_prose()}


def broad_texts(
    keep: Callable[[str, str], bool] | None = None, max_chars: int = _KIND_CHARS
) -> dict[str, str]:
    """Each kind's documents that ``keep(kind, document)`` accepts (all by default), joined, cut at ``max_chars``."""
    texts = {}
    for kind, documents in broad_documents().items():
        parts, total = [], 0
        for document in documents:
            if keep is not None and not keep(kind, document):
                continue
            parts.append(document)
            total += len(document)
            if total >= max_chars:
                break
        if not parts:
            logger.warning("no text found for the broad-mix kind %r; it is left out", kind)
        texts[kind] = "\n\n".join(parts)[:max_chars]
    return texts


def check_broad_mix(fraction: object) -> None:
    """Refuse a broad-mix share that is not a number in ``[0, 0.5)``, naming the fix."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 0.5:
        raise ValueError(
            f"broad mix fraction must be in [0, 0.5) (the share of the windows per built-in kind), got "
            f"{fraction!r}; e.g. 0.0625, or 0 to turn it off"
        )


def with_broad_mix(
    tokenizer,
    calibration: torch.LongTensor,
    *,
    fraction: float = BROAD_FRACTION,
    seed: int = 0,
    texts: Mapping[str, str] | None = None,
) -> torch.LongTensor:
    """Replace a share ``fraction`` of ``calibration``'s windows per kind by windows of that kind.

    The kinds are the built-in ones (:func:`broad_texts`) unless ``texts`` names others; an empty kind is
    left out. The number of windows (and so the calibration cost) stays the same. ``fraction=0`` returns
    the input. :func:`mix_broad` also says which kinds went in.
    """
    return mix_broad(tokenizer, calibration, fraction=fraction, seed=seed, texts=texts)[0]


def mix_broad(
    tokenizer,
    calibration: torch.LongTensor,
    *,
    fraction: float = BROAD_FRACTION,
    seed: int = 0,
    texts: Mapping[str, str] | None = None,
) -> tuple[torch.LongTensor, list[str]]:
    """:func:`with_broad_mix`, and the kinds it mixed in: none when ``fraction`` is 0 or the windows are too few
    (then the calibration is returned unchanged, with a warning), so that a report records what was done."""
    from .data import tokenize_text, windows

    check_broad_mix(fraction)
    n, seq_len = calibration.shape
    count = max(1, round(fraction * n)) if fraction > 0 else 0
    if count == 0:
        return calibration, []
    kinds = {kind: text for kind, text in (broad_texts() if texts is None else texts).items() if text}
    if not kinds:
        logger.warning("Broad mix skipped: no text for any of its kinds")
        return calibration, []
    keep = n - count * len(kinds)
    if keep < n / 2:  # a handful of windows: the mix would replace most of the user's own text
        logger.warning(
            "Broad mix skipped: %d calibration windows are too few for %g per kind (it would keep %d)",
            n,
            fraction,
            keep,
        )
        return calibration, []
    parts = []
    for k, text in enumerate(kinds.values()):
        ids = tokenize_text(tokenizer, text)
        parts.append(windows(ids, seq_len, count, seed + k))
    logger.info("Broad mix: %d of %d windows from %s", n - keep, n, ", ".join(kinds))
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values
    return torch.cat([calibration[kept], *parts]), list(kinds)
