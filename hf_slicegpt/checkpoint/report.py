"""What a slicing run produced, in numbers and pictures: ``slicing_report.json`` and optional PNG plots.

The report is written beside the sliced checkpoint so that a person choosing a sparsity later can see what it
cost (perplexity, parameters, seconds, memory) and what the calibration data looked like (how much variance
each kept width explains, per layer and signal). Plots need matplotlib, imported only when a plot is drawn.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import resource
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .names import REPORT_NAME

logger = logging.getLogger(__name__)

REPORT_FORMAT = 1
PLOTS_DIR = "plots"
_PACKAGES = (
    "hf-slicegpt",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "datasets",
    "huggingface_hub",
    "numpy",
)
_SIGNALS_PER_FIGURE = 16

__all__ = [
    "PLOTS_DIR",
    "REPORT_NAME",
    "PerplexityPoint",
    "build_report",
    "checkpoint_summary",
    "count_parameters",
    "layer_dims",
    "package_versions",
    "peak_memory",
    "plot_perplexity_vs_sparsity",
    "plot_spectra",
    "public_name",
    "pyplot",
    "read_report",
    "safetensors_parameters",
    "signal_summary",
    "write_report",
]


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def count_parameters(model: Any) -> int:
    """Parameters of ``model``, each shared tensor counted once (tied embeddings are one matrix)."""
    return sum(param.numel() for param in model.parameters())  # parameters() skips repeats of a tied tensor


def safetensors_parameters(directory: str | os.PathLike) -> int | None:
    """Parameters stored in a checkpoint directory, read from the safetensors headers (no weights loaded)."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages a result depends on (``None`` when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process and, if CUDA was used, peak CUDA memory allocated by torch."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    cuda = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = int(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))
    return {"max_rss_bytes": int(rss_bytes), "cuda_max_allocated_bytes": cuda}


def layer_dims(config: Any) -> list[dict[str, int | None]]:
    """Per-layer residual-stream widths of a sliced config: what each block reads and writes."""
    rows = []
    for idx, attn_in in enumerate(config.attn_input_dims):
        mlp_in = config.mlp_input_dims[idx] if config.mlp_input_dims else None
        rows.append(
            {
                "layer": idx,
                "attn_input_dim": attn_in,
                "mlp_input_dim": mlp_in,
                "output_dim": config.layer_output_dim(idx),
            }
        )
    return rows


def signal_summary(stats: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Per signal: its width, the kept width and the fraction of calibration variance the kept width explains."""
    return [
        {
            "name": s.name,
            "width": int(s.width),
            "kept_width": int(s.kept_width),
            "explained_variance": float(s.explained_variance),
        }
        for s in stats or ()
    ]


def build_report(
    sliced: Any,
    *,
    model: str,
    settings: Mapping[str, Any],
    dense_parameters: int,
    seconds: Mapping[str, float],
    perplexity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``slicing_report.json`` for a freshly sliced model.

    Args:
        sliced: the :class:`~hf_slicegpt.SlicedModelForCausalLM` returned by ``slice_model`` (its
            ``slicing_stats`` give the explained variances).
        model: where the dense model came from (hub id, path, alias).
        settings: the options the run was asked for (sparsity, calibration source, sizes, seed...).
        dense_parameters: parameters of the dense model, counted before slicing consumed it.
        seconds: wall time per phase.
        perplexity: ``{"data", "seq_len", "tokens", "dense", "sliced"}`` when evaluation was asked for.
    """
    config = sliced.config
    sliced_parameters = count_parameters(sliced)
    signals = signal_summary(getattr(sliced, "slicing_stats", None))
    explained = [s["explained_variance"] for s in signals]
    return {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": public_name(model),
        # Where the dense weights came from (e.g. dequantised from a Q4_1 GGUF): the "dense" figures below
        # describe that copy, not necessarily the original checkpoint.
        "source": dict(getattr(config, "provenance", None) or {}) or None,
        "family": (config.slicing or {}).get("family"),
        "settings": {
            key: public_name(value) if key in _PATH_SETTINGS else value for key, value in settings.items()
        },
        "slicing": dict(config.slicing or {}),
        "hidden_size": config.norm_divisor,
        "embedding_dim": config.embedding_dim,
        "head_input_dim": config.head_input_dim,
        "layers": layer_dims(config),
        "parameters": {
            "dense": int(dense_parameters),
            "sliced": int(sliced_parameters),
            "sliced_fraction": sliced_parameters / dense_parameters if dense_parameters else None,
        },
        "perplexity": dict(perplexity) if perplexity is not None else None,
        "seconds": {k: round(float(v), 3) for k, v in seconds.items()},
        "peak_memory": peak_memory(),
        "explained_variance": {
            "min": min(explained) if explained else None,
            "mean": sum(explained) / len(explained) if explained else None,
        },
        "signals": signals,
        "versions": package_versions(),
    }


# Settings that may name local files or directories: a report travels with the checkpoint, paths do not.
_PATH_SETTINGS = ("model", "output", "calibration", "eval_data")


def public_name(value: Any) -> Any:
    """``value`` without the local part of a path: a file or directory becomes its name; ids stay as they are.

    A checkpoint is published and read on other machines, where a path such as ``/home/me/models/x`` means
    nothing and tells more than it should.
    """
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    looks_local = text.startswith(("/", "~", ".", "\\")) or (len(text) > 1 and text[1] == ":")
    if looks_local or os.path.exists(text):
        return Path(text).expanduser().name or text
    return text


def write_report(report: Mapping[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``slicing_report.json`` into ``directory``."""
    path = Path(directory) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A JSON report file, or ``None`` if it is absent (or unreadable: a warning says so)."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable %s: %s", path, exc)
        return None
    return value if isinstance(value, dict) else None


def read_report(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``slicing_report.json`` of a checkpoint directory, or ``None`` if it has none."""
    return read_json_file(Path(directory) / REPORT_NAME)


def checkpoint_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """Settings, per-layer widths and parameter counts of a sliced checkpoint, without loading its weights.

    Raises ``ValueError`` if ``directory`` is not a sliced checkpoint.
    """
    from transformers import AutoConfig

    from .. import SlicedConfig  # registers the sliced config type

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{str(directory)!r} is not a checkpoint directory: it has no config.json")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if getattr(config, "model_type", None) != SlicedConfig.model_type:
        raise ValueError(
            f"{str(directory)!r} holds a dense {config.model_type!r} model, not a sliced one; "
            "slice it first with `hf-slicegpt slice`"
        )
    report = read_report(directory) or {}
    stored = safetensors_parameters(directory)
    dense = (report.get("parameters") or {}).get("dense")
    from .validation import achieved_sparsity

    slicing = dict(config.slicing or {})
    if slicing.get("achieved_sparsity") is None:  # checkpoints written before it was recorded
        slicing["achieved_sparsity"] = achieved_sparsity(config)
    return {
        "path": str(directory),
        "family": config.family_config.model_type,
        "slicing": slicing,
        "topology": config.topology,
        "hidden_size": config.norm_divisor,
        "num_layers": len(config.attn_input_dims),
        "embedding_dim": config.embedding_dim,
        "head_input_dim": config.head_input_dim,
        "tied_embeddings": bool(config.embed_proj),
        "layers": layer_dims(config),
        "parameters": {
            "dense": dense,
            "sliced": stored,
            "sliced_fraction": stored / dense if stored and dense else None,
        },
        "perplexity": report.get("perplexity"),
        "settings": report.get("settings"),
        "explained_variance": report.get("explained_variance"),
    }


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; a clear ImportError if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'hf-slicegpt[plots]'") from exc
    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def check_plot_file(path: str | os.PathLike) -> Path:
    """Refuse a plot file that cannot be written, before the evaluation it would draw: matplotlib missing, a
    format it cannot write, a directory in its place, or a parent that cannot be created."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    from .io import check_output_writable

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(
            f"plot file {str(path)!r}: {('format ' + repr(suffix)) if suffix else 'no format'} is not one "
            f"matplotlib writes ({', '.join(sorted(formats))}); name it e.g. {path.stem or 'plot'}.png"
        )
    if path.is_dir():
        raise ValueError(
            f"plot file {str(path)!r} is a directory; name a file, e.g. {str(path / 'plot.png')!r}"
        )
    check_output_writable(path)
    return path


def plot_spectra(stats: Sequence[Any], directory: str | os.PathLike) -> list[Path]:
    """PNG pictures of the calibration eigenvalue spectra, each with its kept width marked.

    Writes ``cumulative_variance.png`` (the explained-variance curve of every signal, coloured by depth, with
    the kept widths marked: how much each sparsity would keep), ``explained_variance.png`` (the kept fraction
    per signal, in order) and ``spectra_NN.png`` (log eigenvalues, up to 16 signals per page).
    """
    if not stats:
        raise ValueError("no eigenvalue spectra to plot: the model has no slicing_stats")
    plt = pyplot()
    import numpy as np

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(stats)))

    fig, ax = plt.subplots(figsize=(8, 5))
    for s, colour in zip(stats, colours):
        values = np.clip(np.asarray(s.eigenvalues, dtype=float), 0, None)
        cumulative = np.cumsum(values) / values.sum() if values.sum() > 0 else np.ones_like(values)
        ax.plot(np.arange(1, len(values) + 1), cumulative, color=colour, linewidth=0.8)
    kept = sorted({s.kept_width for s in stats})
    for width in kept:
        ax.axvline(width, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("kept width (principal components)")
    ax.set_ylabel("fraction of variance explained")
    ax.set_title(f"Calibration variance kept per signal (red: kept width {', '.join(map(str, kept))})")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, len(stats) - 1))
    fig.colorbar(sm, ax=ax, label="signal index (depth)")
    paths.append(_save(fig, out / "cumulative_variance.png", plt))

    fig, ax = plt.subplots(figsize=(max(8, len(stats) * 0.15), 4))
    ax.plot([s.explained_variance for s in stats], marker="o", markersize=3)
    ax.set_xlabel("signal (embeddings, then per layer)")
    ax.set_ylabel("variance explained by kept width")
    ax.set_title("Fraction of calibration variance kept, per signal")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / "explained_variance.png", plt))

    for page, start in enumerate(range(0, len(stats), _SIGNALS_PER_FIGURE)):
        chunk = stats[start : start + _SIGNALS_PER_FIGURE]
        cols = 4
        rows = math.ceil(len(chunk) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
        for ax, s in zip(axes.flat, chunk):
            values = np.clip(np.asarray(s.eigenvalues, dtype=float), 1e-30, None)
            ax.semilogy(np.arange(1, len(values) + 1), values, linewidth=1)
            ax.axvline(s.kept_width, color="red", linestyle="--", linewidth=1)
            ax.set_title(f"{s.name}\nkept {s.kept_width}/{s.width}: {s.explained_variance:.1%}", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(chunk) :]:
            ax.set_visible(False)
        fig.suptitle("Eigenvalues of the calibration covariance (red: kept width)")
        paths.append(_save(fig, out / f"spectra_{page:02d}.png", plt))
    logger.info("Wrote %d plots to %s", len(paths), out)
    return paths


@dataclass(frozen=True)
class PerplexityPoint:
    """One model on a perplexity-vs-sparsity plot."""

    label: str
    sparsity: float
    perplexity: float


def plot_perplexity_vs_sparsity(
    points: Sequence[PerplexityPoint], path: str | os.PathLike, *, data: str = ""
) -> Path:
    """A PNG of perplexity against sparsity (log scale): the picture for choosing a sparsity."""
    if not points:
        raise ValueError("no models to plot")
    plt = pyplot()
    ordered = sorted(points, key=lambda p: p.sparsity)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p.sparsity * 100 for p in ordered], [p.perplexity for p in ordered], marker="o")
    for p in ordered:
        ax.annotate(
            f"{p.perplexity:.2f}", (p.sparsity * 100, p.perplexity), textcoords="offset points", xytext=(4, 6)
        )
    if all(p.perplexity > 0 and math.isfinite(p.perplexity) for p in ordered):
        ax.set_yscale("log")
    ax.set_xlabel("sparsity (% of the hidden size removed)")
    ax.set_ylabel("perplexity" + (f" on {data}" if data else ""))
    ax.set_title("Perplexity vs sparsity")
    ax.grid(alpha=0.3, which="both")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
