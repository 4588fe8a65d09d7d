"""In-domain and out-of-domain perplexity of sliced SmolLM2, relative to dense.

Calibrate on one source (default: ``pydocs``), then evaluate on its held-out part (in-domain) and on clearly
different text that every Debian machine or this script provides (out-of-domain):

- ``licenses``: the licence texts under /usr/share/common-licenses (legal English);
- ``git-notes``: git's release notes under /usr/share/doc/git/RelNotes (terse changelog English with code);
- ``synthetic``: structured text generated here (JSON records, CSV rows, arithmetic, identifiers).

Variants: plain SliceGPT, the vocabulary prior in the first basis, self-generated calibration text, both,
vocabulary-swapped copies of the calibration windows (``--calibration-augment swap:0.3``), and ``mix``: a share
``--mix-fraction`` of the windows from each out-of-domain kind of text, taken from *other documents* than the
ones evaluated (other licences, older release notes, synthetic text with another seed), as
``--calibration-mix`` does.

    .venv/bin/python benchmarks/robustness.py --sparsities 0.1,0.2,0.25,0.3 --out benchmarks/results/robustness.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import hf_slicegpt
from hf_slicegpt.workflows.augment import self_generated_tokens, swap_for_tokenizer
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens, mixed_calibration_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer
from hf_slicegpt.workflows.rft import RFTConfig, rft

logger = logging.getLogger("robustness")

VARIANTS = {
    "plain": dict(vocab_prior=0.0, augment=0, swap=0.0),
    "vocab-prior": dict(vocab_prior=1.0, augment=0, swap=0.0),
    "self-augment": dict(vocab_prior=0.0, augment=32, swap=0.0),
    "prior+augment": dict(vocab_prior=1.0, augment=32, swap=0.0),
    "swap": dict(vocab_prior=0.0, augment=0, swap=0.3),
    "mix": dict(vocab_prior=0.0, augment=0, swap=0.0, mix=True),
}


def synthetic_text(seed: int = 0, records: int = 1500) -> str:
    """Deterministic structured text: the formatting, digits and symbols that prose calibration misses."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta", "zeta", "lambda"]
    lines = []
    for i in range(records):
        kind = i % 4
        if kind == 0:
            lines.append(
                f'{{"id": {rng.randint(1000, 99999)}, "name": "{rng.choice(words)}_{rng.randint(0, 99)}", '
                f'"value": {rng.uniform(-1e3, 1e3):.4f}, "tags": ["{rng.choice(words)}", "{rng.choice(words)}"]}}'
            )
        elif kind == 1:
            lines.append(",".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(8)))
        elif kind == 2:
            a, b = rng.randint(1, 9999), rng.randint(1, 9999)
            lines.append(f"{a} + {b} = {a + b}; {a} * {b} = {a * b}")
        else:
            ident = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_0123456789") for _ in range(12))
            lines.append(
                f"def {ident}(x, y={rng.randint(0, 9)}):\n    return x ** {rng.randint(2, 5)} - y  # {ident}"
            )
    return "\n".join(lines)


def shares_text_with(texts: list[str], n: int = 13) -> Callable[[str], bool]:
    """A test of whether a document repeats any run of ``n`` words of ``texts`` (case and punctuation aside).

    Used to leave such documents out of a calibration mix, so that no figure is measured on text that was
    calibrated on (13 words, as in GPT-3's decontamination).
    """
    seen = {gram for text in texts for gram in _word_grams(text, n)}
    return lambda document: any(gram in seen for gram in _word_grams(document, n))


def _word_grams(text: str, n: int) -> Iterator[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return (tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def ood_sources(root: Path) -> dict[str, str]:
    """Write the out-of-domain texts as .txt directories under ``root``; return source paths by name."""
    sources = {}
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        target = root / "licenses"
        target.mkdir()
        for path in sorted(p for p in licenses.iterdir() if p.is_file()):
            (target / f"{path.name}.txt").write_text(path.read_text(errors="replace"))
        sources["licenses"] = str(target)
    notes = Path("/usr/share/doc/git/RelNotes")
    if notes.is_dir():
        target = root / "git-notes"
        target.mkdir()
        for path in sorted(notes.glob("*.txt"))[-60:]:
            (target / path.name).write_text(path.read_text(errors="replace"))
        sources["git-notes"] = str(target)
    (root / "synthetic.txt").write_text(synthetic_text())
    sources["synthetic"] = str(root / "synthetic.txt")
    return sources


def ood_calibration_sources(root: Path) -> dict[str, str]:
    """Text of the same kinds as :func:`ood_sources` but from documents the evaluation never reads."""
    sources = {}
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():  # the evaluation reads the first files (Apache-2.0, Artistic, BSD, CC0...)
        target = root / "licenses-other"
        target.mkdir()
        for path in sorted(
            p for p in licenses.iterdir() if p.is_file() and p.name.startswith(("GPL", "LGPL", "MPL"))
        ):
            (target / f"{path.name}.txt").write_text(path.read_text(errors="replace"))
        sources["licenses"] = str(target)
    notes = Path("/usr/share/doc/git/RelNotes")
    if notes.is_dir():  # the evaluation reads the newest 60
        target = root / "git-notes-older"
        target.mkdir()
        for path in sorted(notes.glob("*.txt"))[:-60]:
            (target / path.name).write_text(path.read_text(errors="replace"))
        sources["git-notes"] = str(target)
    (root / "synthetic-other.txt").write_text(synthetic_text(seed=1))
    sources["synthetic"] = str(root / "synthetic-other.txt")
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibration", default="pydocs")
    parser.add_argument("--sparsities", default="0.1,0.2,0.25,0.3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--rft-steps",
        type=int,
        default=0,
        help="then recovery fine-tune each sliced model on the calibration source's training part (LoRA, the RFT "
        "section's settings: 128 x 256 windows, batch 2, lr 1e-3) for this many steps before measuring",
    )
    parser.add_argument(
        "--mix-fraction", type=float, default=1 / 12, help="share of windows per out-of-domain kind ('mix')"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    workdir = Path(tempfile.mkdtemp(prefix="robustness-"))
    dense, tokenizer = load_model_and_tokenizer(args.model)
    calib = calibration_tokens(
        tokenizer, args.calibration, num_samples=args.num_samples, seq_len=args.seq_len, seed=0
    )
    evals = {
        "in-domain": evaluation_tokens(tokenizer, args.calibration, seq_len=512, max_tokens=args.eval_tokens)
    }
    for name, source in ood_sources(workdir).items():
        evals[name] = evaluation_tokens(
            tokenizer, source, seq_len=512, max_tokens=args.eval_tokens, split="all"
        )

    def measure(model) -> dict[str, float]:
        return {
            name: perplexity(model, ids, batch_size=4, show_progress=False).perplexity
            for name, ids in evals.items()
        }

    dense_ppl = measure(dense)
    logger.info("dense: %s", dense_ppl)
    augment_cache: dict[int, torch.Tensor] = {}
    rows = []
    for variant in args.variants.split(","):
        settings = VARIANTS[variant]
        if settings["augment"] and settings["augment"] not in augment_cache:
            augment_cache[settings["augment"]] = self_generated_tokens(
                dense, tokenizer, settings["augment"], args.seq_len, seed=0, show_progress=False
            )
        for sparsity in map(float, args.sparsities.split(",")):
            model, _ = load_model_and_tokenizer(args.model)
            data = calib
            if settings["augment"]:
                data = torch.cat([calib, augment_cache[settings["augment"]]])
            if settings.get("mix"):
                mix = [
                    (source, args.mix_fraction)
                    for source in ood_calibration_sources(Path(tempfile.mkdtemp())).values()
                ]
                data = mixed_calibration_tokens(
                    tokenizer,
                    args.calibration,
                    mix,
                    num_samples=args.num_samples,
                    seq_len=args.seq_len,
                    seed=0,
                )
            if settings["swap"]:
                data = torch.cat([data, swap_for_tokenizer(calib, settings["swap"], tokenizer, seed=0)])
            start = time.perf_counter()
            sliced = hf_slicegpt.slice_model(
                model, data, sparsity, vocab_prior=settings["vocab_prior"], show_progress=False
            )
            seconds = time.perf_counter() - start
            if args.rft_steps:
                config = RFTConfig(
                    num_samples=128,
                    seq_len=256,
                    max_steps=args.rft_steps,
                    batch_size=2,
                    learning_rate=1e-3,
                    warmup_steps=0.05,
                    logging_steps=10,
                    use_cpu=not torch.cuda.is_available(),
                )
                sliced = rft(
                    sliced,
                    tokenizer,
                    args.calibration,
                    None,
                    config,
                    evaluate=False,
                    checkpoint_dir=tempfile.mkdtemp(prefix="robustness-rft-"),
                    show_progress=False,
                ).model.eval()
            ppl = measure(sliced)
            rows.append(
                dict(
                    variant=variant + (f"+rft{args.rft_steps}" if args.rft_steps else ""),
                    sparsity=sparsity,
                    seconds=seconds,
                    ppl=ppl,
                    relative={k: v / dense_ppl[k] for k, v in ppl.items()},
                )
            )
            logger.info(
                "%s @ %.2f: %s", variant, sparsity, {k: round(v, 2) for k, v in rows[-1]["relative"].items()}
            )
            del sliced, model

    names = list(evals)
    print(
        "perplexity relative to dense (dense: "
        + ", ".join(f"{k} {v:.2f}" for k, v in dense_ppl.items())
        + ")"
    )
    print(f"{'variant':15s} {'sparsity':>8s} " + " ".join(f"{n:>10s}" for n in names))
    for row in rows:
        print(
            f"{row['variant']:15s} {row['sparsity']:8.2f} "
            + " ".join(f"{row['relative'][n]:10.2f}" for n in names)
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "dense": dense_ppl, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
