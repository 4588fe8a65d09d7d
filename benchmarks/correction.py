"""Output-aware correction (issue 17): plain SliceGPT against each improvement, in and out of domain.

Calibrate SmolLM2 on one source (default ``pydocs``), slice at each sparsity and mode, and measure perplexity
relative to dense on the held-out part of the calibration source (in-domain), on every out-of-domain source of
``benchmarks/robustness.py`` (licences, git release notes, synthetic records), and on ``fortunes``: ordinary
English quotations and prose from the Debian ``fortunes`` package, read from the apt cache or an installed
``/usr/share/games/fortunes`` (no setting was tuned on it; evaluation only; skipped when absent).

Variants (comma-separated ``--variants``):

- ``plain``: the paper (``correction="none"``);
- ``ridge``: the writers refit to the dense outputs on every calibration batch (``correction_fraction=1.0``);
- ``ridge+shortcuts`` / ``default+shortcuts`` / ``default+shortcuts+mix``: the shortcut matrices refit too
  (``correction_shortcuts=True``, the default before 2026-12-03);
- ``ridge-half`` / ``ridge-quarter`` / ``ridge-eighth``: the ridge fitted on every 2nd / 4th / 8th
  calibration batch (``correction_fraction``);
- ``default``: the library's default (``correction_fraction=None``: every batch up to 65,536 calibration
  tokens, every k-th beyond, so about that many are fitted; at 128 x 512 that is ``ridge``, every batch);
- ``default-dense`` / ``ridge-quarter-dense``: with each basis taken from the dense model's output that the
  correction fits (``correction_basis="dense"``): bases chosen by what the next computations should see;
- ``mix`` / ``ridge+mix`` / ``ridge-quarter+mix`` / ``default+mix``: the built-in broad mix
  (``hf_slicegpt.workflows.broadmix``) blended into the calibration windows (same number of windows), less
  every document that repeats 13 words of an evaluated text (recorded as ``broad_mix`` in the JSON);
  ``default+mix-code-structured``: the mix without its ``prose`` kind, as it was until 2026-12-04;
  ``default+mix+generated`` / ``default+mix-prose+generated``: with text the dense model samples itself
  (:func:`generated_text`) as a fourth kind, or in place of ``prose`` (measured 2026-12-04, not adopted);
  ``default+mix-3/32`` / ``default+mix-1/8``: a larger share of the windows per kind than the library's 1/16
  (36 / 48 of 128 windows replaced instead of 24; measured 2026-12-05);
  ``default+mix-weighted``: the library's mix, its windows counted 2.5 times in every covariance (a
  :class:`~hf_slicegpt.slicing.SlicingHooks` hook, :func:`weigh_last_windows`), so the bases give the mixed
  kinds the share that ``1/8`` gives them (60 of 164 against 48 of 128) while every pydocs window stays for
  the correction's fit (measured 2026-12-05, not adopted);
  ``default+mix-readers``: the library's mix, each basis the PCA of the covariance weighted by what the
  signal's next readers make of each direction (:func:`reader_weighted`; measured 2026-12-05 at 0.5 and
  ``default+mix-readers-0.1`` at 0.1, not adopted: in-domain 2.06x and 2.51x).

Slicing time is reported against one dense forward over the same calibration tokens, measured in the same run.

    nice .venv/bin/python benchmarks/correction.py --sparsities 0.25 --num-samples 32 --variants plain,ridge
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from robustness import ood_sources, shares_text_with  # noqa: E402

import hf_slicegpt  # noqa: E402
from hf_slicegpt.slicing import Covariance, SlicingHooks  # noqa: E402
from hf_slicegpt.workflows.broadmix import BROAD_FRACTION, BROAD_KINDS, broad_texts, mix_broad  # noqa: E402
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens  # noqa: E402
from hf_slicegpt.workflows.evaluation import perplexity  # noqa: E402
from hf_slicegpt.workflows.loading import load_model_and_tokenizer  # noqa: E402

logger = logging.getLogger("correction")

VARIANTS = {
    "plain": dict(correction="none"),
    "ridge": dict(correction="ridge", correction_fraction=1.0),  # every batch
    "ridge-half": dict(correction="ridge", correction_fraction=0.5),
    "ridge-quarter": dict(correction="ridge", correction_fraction=0.25),
    "default": dict(correction="ridge", correction_fraction=None),  # fraction: automatic (~16k tokens fitted)
    "default+mix": dict(correction="ridge", correction_fraction=None, mix=True),
    # the broad mix before its "prose" kind (2026-12-03)
    "default+mix-code-structured": dict(
        correction="ridge", correction_fraction=None, mix=("code", "structured")
    ),
    # text the dense model samples itself (generated_text), as a fourth kind / instead of package prose: measured
    # on 2026-12-04, not adopted
    "default+mix+generated": dict(
        correction="ridge", correction_fraction=None, mix=("code", "structured", "prose", "generated")
    ),
    "default+mix-prose+generated": dict(
        correction="ridge", correction_fraction=None, mix=("code", "structured", "generated")
    ),
    # a larger share per kind than BROAD_FRACTION (1/16): what more mixed text buys out of domain, and costs in it
    "default+mix-3/32": dict(correction="ridge", correction_fraction=None, mix=True, mix_fraction=3 / 32),
    "default+mix-1/8": dict(correction="ridge", correction_fraction=None, mix=True, mix_fraction=1 / 8),
    "default+mix-weighted": dict(correction="ridge", correction_fraction=None, mix=True, mix_weight=2.5),
    "default+mix-readers": dict(correction="ridge", correction_fraction=None, mix=True, readers=0.5),
    "default+mix-readers-0.1": dict(correction="ridge", correction_fraction=None, mix=True, readers=0.1),
    "default-dense": dict(correction="ridge", correction_fraction=None, correction_basis="dense"),
    "ridge-eighth": dict(correction="ridge", correction_fraction=0.125),
    "ridge-quarter-dense": dict(correction="ridge", correction_fraction=0.25, correction_basis="dense"),
    "mix": dict(correction="none", mix=True),
    "ridge+mix": dict(correction="ridge", correction_fraction=1.0, mix=True),  # every batch, as "ridge"
    "ridge-quarter+mix": dict(correction="ridge", correction_fraction=0.25, mix=True),
    "ridge+shortcuts": dict(correction="ridge", correction_fraction=1.0, correction_shortcuts=True),
    "default+shortcuts": dict(correction="ridge", correction_fraction=None, correction_shortcuts=True),
    "default+shortcuts+mix": dict(
        correction="ridge", correction_fraction=None, correction_shortcuts=True, mix=True
    ),
}
FORTUNE_FILES = ("people", "wisdom", "love", "education", "work", "food", "pets", "humorists", "men-women")


def fortunes(root: Path) -> str | None:
    """Fortune cookies (English quotations and short prose) as a .txt directory, or None if unavailable."""
    installed = Path("/usr/share/games/fortunes")
    if not installed.is_dir():
        debs = sorted(Path("/var/cache/apt/archives").glob("fortunes_*_all.deb"))
        if not debs:
            return None
        unpacked = root / "fortunes-deb"
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
        installed = unpacked / "usr/share/games/fortunes"
    target = root / "fortunes"
    target.mkdir()
    for name in FORTUNE_FILES:
        path = installed / name
        if path.is_file():
            text = path.read_text(errors="replace").replace("\n%\n", "\n\n")
            (target / f"{name}.txt").write_text(text)
    return str(target)


def weigh_last_windows(first: int, weight: float) -> SlicingHooks:
    """A covariance hook that counts the calibration windows from index ``first`` on ``weight`` times.

    ``mix_broad`` appends the mixed windows after the kept ones, so this gives the mixed kinds a larger share of
    what every basis keeps. The correction's normal equations are not weighted: it fits on every window as
    before. Rows are scaled by ``sqrt(weight)`` and re-summed, so ``X^T W X`` is built with the public
    :class:`~hf_slicegpt.slicing.Covariance`. One process only (the batches of one rank, in calibration order).
    """
    scale = math.sqrt(weight)

    def hook(name: str, cov: Covariance, signals, masks) -> Covariance:
        if not signals:  # global rotation's dense pass sums as it goes: nothing to re-sum
            return cov
        weighted = Covariance(cov.width, device=cov.sum.device, name=cov.name, precision=cov.precision)
        row = 0
        for signal, mask in zip(signals, masks):
            rows = torch.ones(signal.shape[0], dtype=signal.dtype, device=signal.device)
            rows[max(first - row, 0) :] = scale
            row += signal.shape[0]
            weighted.add(signal * rows.view(-1, *[1] * (signal.dim() - 1)), mask)
        return weighted

    return SlicingHooks(covariance=hook)


def reader_weighted(dense, alpha: float = 0.5) -> SlicingHooks:
    """A covariance hook that weighs each residual direction by what the signal's next readers make of it.

    The readers of a block's output are the next block's attention inputs (the final norm and the head after
    the last block); those of the attention output are the same block's MLP inputs. With ``R`` the readers'
    dense weights stacked, each scaled by its norm's weight, ``G = R^T R / mean(diag(R^T R))`` says how much a
    unit of error along each direction changes what they read. The basis is then the PCA of
    ``G_a^(1/2) C G_a^(1/2)`` with ``G_a = (1 - alpha) I + alpha G``: the residual stream also carries the signal
    past the next readers, so the input variance keeps weight ``1 - alpha``. Llama-style names only (SmolLM2);
    per-layer rotation only. Written and measured 2026-12-05 (issue 17, "bases chosen by what comes next").
    """
    layers = dense.model.layers

    def readers(name: str) -> torch.Tensor:
        if name == "embeddings" or (name.endswith(" output") and not name.endswith("attention output")):
            nxt = 0 if name == "embeddings" else int(name.split()[1]) + 1
            if nxt == len(layers):
                return dense.lm_head.weight * dense.model.norm.weight
            attn, norm = layers[nxt].self_attn, layers[nxt].input_layernorm.weight
            return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) * norm
        layer = layers[int(name.split()[1])]
        norm = layer.post_attention_layernorm.weight
        return torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]) * norm

    def hook(name: str, cov: Covariance, signals, masks) -> Covariance:
        r = readers(name).detach().to(torch.float64)
        g = r.T @ r
        g = (1 - alpha) * torch.eye(g.shape[0], dtype=g.dtype) + alpha * g / g.diagonal().mean()
        values, vectors = torch.linalg.eigh(g)
        root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        weighted = Covariance(cov.width, device=cov.sum.device, name=cov.name, precision=cov.precision)
        weighted.sum = (root @ cov.sum.cpu() @ root).to(cov.sum.device)
        weighted.tokens, weighted.reduced = cov.tokens, cov.reduced
        return weighted

    return SlicingHooks(covariance=hook)


def dense_forward_seconds(model, calib: torch.LongTensor, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, calib.shape[0], batch_size):
            model(calib[i : i + batch_size])
    return time.perf_counter() - start


def decontaminated_mix(tokenizer, evals: dict[str, torch.Tensor]) -> tuple[dict[str, str], dict]:
    """The built-in broad mix without any document that repeats 13 words of the evaluated text.

    The library's mix may hold text that a benchmark evaluates on (the Apache licence ships with several
    packages and is also the first licence read here); figures measured on it would flatter the mix.
    """
    overlaps = shares_text_with([tokenizer.decode(ids.flatten()) for ids in evals.values()])
    dropped: dict[str, int] = {}

    def keep(kind: str, document: str) -> bool:
        if overlaps(document):
            dropped[kind] = dropped.get(kind, 0) + 1
            return False
        return True

    texts = broad_texts(keep=keep)
    record = {"chars": {k: len(v) for k, v in texts.items()}, "documents_left_out": dropped}
    logger.info("broad mix, decontaminated: %s", record)
    return texts, record


def _kinds(mix: bool | tuple[str, ...] | None) -> set[str]:
    """The kinds a variant's ``mix`` names: ``True`` is the library's built-in ones."""
    if mix is True:
        return set(BROAD_KINDS)
    return set(mix or ())


def generated_text(dense, tokenizer, evals: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """16 sequences of 560 tokens the dense model samples from its BOS token (seed 0, temperature 1, top-p 0.95,
    ``generate``'s other defaults), decoded and joined, less any that repeats 13 words of an evaluated text.

    A candidate fourth kind of the broad mix (2026-12-04): ordinary prose every machine has, since the model
    writes it. Measured, not adopted (BENCHMARKS.md, "Self-generated text as a fourth kind"). Not the library's
    ``workflows.augment.self_generated_tokens``, which samples without a top-k cut: the published figures were
    measured with ``generate``'s default top-k, and calling it would change the sampled text.
    """
    start = time.perf_counter()
    torch.manual_seed(0)
    bos = torch.full((16, 1), tokenizer.bos_token_id)
    out = dense.generate(
        bos,
        attention_mask=torch.ones_like(bos),
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
        max_new_tokens=560,
        min_new_tokens=560,
        pad_token_id=tokenizer.eos_token_id,
    )
    documents = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    overlaps = shares_text_with([tokenizer.decode(ids.flatten()) for ids in evals.values()])
    kept = [d for d in documents if not overlaps(d)]
    record = {"documents": len(documents), "kept": len(kept), "seconds": time.perf_counter() - start}
    logger.info("generated: %s", record)
    return "\n\n".join(kept), record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calibration", default="pydocs")
    parser.add_argument("--sparsities", default="0.25")
    parser.add_argument("--modes", default="layer", help="comma-separated rotations: layer,global")
    parser.add_argument("--variants", default="plain,ridge")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--no-ood", action="store_true", help="in-domain only (plus any --extra-source)")
    parser.add_argument(
        "--extra-source",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another evaluation text (a .txt file or folder), e.g. one no setting was chosen on: "
        "perldiag=/usr/share/perl/5.36/pod/perldiag.pod (repeatable)",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip timing the dense forward")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--dense-cache", type=Path, default=None, help="JSON file to reuse dense figures from"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("hf_slicegpt.workflows.data", "hf_slicegpt.workflows.broadmix"):
        logging.getLogger(name).setLevel(logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="correction-"))
    dense, tokenizer = load_model_and_tokenizer(args.model)
    dense.eval()
    calib = calibration_tokens(
        tokenizer, args.calibration, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed
    )
    evals = {
        "in-domain": evaluation_tokens(tokenizer, args.calibration, seq_len=512, max_tokens=args.eval_tokens)
    }
    if not args.no_ood:
        sources = ood_sources(workdir)
        prose = fortunes(workdir)
        if prose is not None:
            sources["fortunes"] = prose
        for name, source in sources.items():
            evals[name] = evaluation_tokens(
                tokenizer, source, seq_len=512, max_tokens=args.eval_tokens, split="all"
            )

    for spec in args.extra_source:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).exists():
            parser.error(f"--extra-source wants NAME=PATH with an existing path, got {spec!r}")
        if Path(path).is_file() and Path(path).suffix != ".txt":  # the loader reads .txt files
            copy_to = workdir / f"{name}.txt"
            copy_to.write_text(Path(path).read_text(errors="replace"))
            path = str(copy_to)
        evals[name] = evaluation_tokens(
            tokenizer, path, seq_len=512, max_tokens=args.eval_tokens, split="all"
        )

    mix_texts, mix_record = decontaminated_mix(tokenizer, evals)
    if any(_kinds(VARIANTS[v].get("mix")) & {"generated"} for v in args.variants.split(",")):
        mix_texts["generated"], mix_record["generated"] = generated_text(dense, tokenizer, evals)

    def measure(model) -> dict[str, float]:
        return {
            n: perplexity(model, ids, batch_size=4, show_progress=False).perplexity
            for n, ids in evals.items()
        }

    key = f"{args.model}|{args.calibration}|{args.num_samples}x{args.seq_len}|{args.eval_tokens}|{sorted(evals)}"
    cache = json.loads(args.dense_cache.read_text()) if args.dense_cache and args.dense_cache.exists() else {}
    if key in cache:  # the dense figures of an earlier run with the same data (exploration on a busy machine)
        dense_ppl, dense_seconds = cache[key]["ppl"], cache[key]["seconds"]
    else:
        dense_ppl = measure(dense)
        dense_seconds = math.nan if args.no_timing else dense_forward_seconds(dense, calib, args.batch_size)
        if args.dense_cache:
            cache[key] = {"ppl": dense_ppl, "seconds": dense_seconds}
            args.dense_cache.write_text(json.dumps(cache, indent=2))
    logger.info("dense: %s; one dense forward over the calibration: %.1f s", dense_ppl, dense_seconds)
    dense_params = sum(p.numel() for p in dense.parameters())
    rows = []
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            settings = VARIANTS[variant]
            mix, data, hooks = settings.get("mix"), calib, None
            if mix:  # True: every built-in kind; a tuple: those kinds
                kinds = {k: v for k, v in mix_texts.items() if k in _kinds(mix)}
                fraction = settings.get("mix_fraction", BROAD_FRACTION)
                data, mixed = mix_broad(tokenizer, calib, fraction=fraction, texts=kinds)
                if "mix_weight" in settings and mixed:  # the mixed windows come last
                    first = len(calib) - max(1, round(fraction * len(calib))) * len(mixed)
                    hooks = weigh_last_windows(first, settings["mix_weight"])
            if "readers" in settings:
                hooks = reader_weighted(dense, settings["readers"])
            for sparsity in map(float, args.sparsities.split(",")):
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                sliced = hf_slicegpt.slice_model(
                    model,
                    data,
                    sparsity,
                    rotation=mode,
                    batch_size=args.batch_size,
                    correction=settings["correction"],
                    correction_fraction=settings.get("correction_fraction"),
                    correction_basis=settings.get("correction_basis", "sliced"),
                    correction_shortcuts=settings.get("correction_shortcuts", False),
                    hooks=hooks,
                    show_progress=False,
                )
                seconds = time.perf_counter() - start
                ppl = measure(sliced)
                params = sum(p.numel() for p in sliced.parameters())
                row = dict(
                    mode=mode,
                    variant=variant,
                    sparsity=sparsity,
                    seconds=seconds,
                    slice_over_dense_forward=seconds / dense_seconds,
                    params_over_dense=params / dense_params,
                    ppl=ppl,
                    relative={k: v / dense_ppl[k] for k, v in ppl.items()},
                )
                rows.append(row)
                logger.info(
                    "%s %s @ %.2f (%.0f s, %.2fx dense fwd): %s",
                    mode,
                    variant,
                    sparsity,
                    seconds,
                    row["slice_over_dense_forward"],
                    {k: round(v, 3) for k, v in row["relative"].items()},
                )
                del sliced, model
    names = list(evals)
    print(
        "perplexity relative to dense (dense: "
        + ", ".join(f"{k} {v:.2f}" for k, v in dense_ppl.items())
        + ")"
    )
    print(
        f"calibration {args.calibration} {args.num_samples} x {args.seq_len}; one dense forward over it "
        f"{dense_seconds:.1f} s"
    )
    header = ["mode", "variant", "sparsity", *names, "params", "slice s", "slice/fwd"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["mode"], r["variant"], f"{r['sparsity']:.2f}", *(f"{r['relative'][n]:.3f}" for n in names)]
        cells += [
            f"{r['params_over_dense']:.3f}",
            f"{r['seconds']:.0f}",
            f"{r['slice_over_dense_forward']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "broad_mix": mix_record,
            "dense": dense_ppl,
            "rows": rows,
        }
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
