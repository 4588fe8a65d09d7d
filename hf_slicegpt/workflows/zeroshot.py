"""Zero-shot accuracy with lm-eval (EleutherAI's lm-evaluation-harness), on a model in memory or on disk.

The SliceGPT paper reports PIQA, WinoGrande, HellaSwag, ARC-e and ARC-c, each with one metric: length-normalised
accuracy (``acc_norm``) for PIQA, HellaSwag and both ARC sets, plain accuracy (``acc``) for WinoGrande, and
their average. :func:`evaluate_tasks` runs those (or any lm-eval tasks) through lm-eval's own Hugging Face
wrapper (``HFLM``), so the numbers are lm-eval's, and returns them as a JSON-ready dict.

A saved sliced checkpoint also works with lm-eval's command line and no plugin, through the modeling code
shipped beside the weights::

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks piqa,winogrande

lm-eval is an optional dependency (``pip install 'hf-slicegpt[eval]'``); it is imported only when used.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SliceGPTError

logger = logging.getLogger(__name__)

PAPER_TASKS: tuple[str, ...] = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
PRIMARY_METRICS: dict[str, str] = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
}
RESULTS_NAME = "zeroshot_results.json"
_FALLBACK_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc")


class ZeroShotError(SliceGPTError):
    """Zero-shot evaluation cannot run with these arguments."""


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from ``"piqa,winogrande"`` or a list; ``"paper"`` stands for the paper's five tasks."""
    names = tasks.replace(" ", ",").split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        for task in PAPER_TASKS if name == "paper" else (name,):
            if task not in out:
                out.append(task)
    if not out:
        raise ZeroShotError(f"no task names in {tasks!r}; e.g. --tasks piqa,winogrande (or 'paper')")
    return out


_OFFLINE_MARKERS = ("OfflineModeIsEnabled", "Couldn't reach", "offline mode", "Max retries exceeded")


def _is_unreachable_dataset(exc: BaseException) -> bool:
    """Whether ``exc`` (from building lm-eval's tasks) says a dataset could not be fetched from the Hub."""
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(m in str(exc) for m in _OFFLINE_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def offline_task_error(tasks: Sequence[str], exc: BaseException) -> ZeroShotError:
    """One line for a task whose dataset lives on the Hub, when the Hub cannot be reached: what to do instead."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ZeroShotError(
        f"lm-eval tasks {', '.join(tasks)} fetch their datasets from the Hugging Face Hub, which cannot be reached "
        f"({reason}); offline, pass --include-path DIR (include_path=) with a local task YAML whose "
        "dataset_kwargs.data_files name local files (see the README), or run once online to fill the datasets cache"
    )


def require_lm_eval() -> Any:
    """lm-eval, or an ImportError saying how to install it (the CLI checks it before evaluating any model)."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            "zero-shot evaluation needs lm-eval: pip install 'hf-slicegpt[eval]' (or lm_eval>=0.4.5)"
        ) from exc
    return lm_eval


def primary_metric(
    task: str, metrics: Mapping[str, Any], override: Mapping[str, str] | None = None
) -> str | None:
    """The metric reported for ``task``: an override, the paper's choice, else ``acc_norm``/``acc``/...."""
    available = {
        key.split(",")[0] for key in metrics if "_stderr" not in key and key not in ("alias", "name")
    }
    for choice in ((override or {}).get(task), PRIMARY_METRICS.get(task)):
        if choice is not None:
            if choice not in available:
                raise ZeroShotError(f"task {task!r} has no metric {choice!r}; it reports {sorted(available)}")
            return choice
    for choice in _FALLBACK_METRICS:
        if choice in available:
            return choice
    numeric = sorted(k for k in available if isinstance(_metric_value(metrics, k), (int, float)))
    return numeric[0] if numeric else None


def _other_metrics(metrics: Mapping[str, Any], primary: str | None) -> list[str]:
    """Numeric metrics of a task besides ``primary``, in the preferred order, then by name."""
    names = {
        key.split(",")[0]
        for key, value in metrics.items()
        if "_stderr" not in key
        and key not in ("alias", "name", "sample_len")
        and _as_float(value) is not None
    }
    names.discard(primary)
    return sorted(names, key=lambda n: (_FALLBACK_METRICS.index(n) if n in _FALLBACK_METRICS else 99, n))


def _metric_value(metrics: Mapping[str, Any], name: str) -> Any:
    for key, value in metrics.items():
        if key.split(",")[0] == name:
            return value
    return None


def _as_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a missing stderr
        return None
    return number if math.isfinite(number) else None


def _harness_model(
    model: Any,
    tokenizer: Any,
    device: str | None,
    batch_size: int | str,
    max_length: int | None,
    trust_remote_code: bool,
) -> tuple[Any, str]:
    """lm-eval's ``HFLM`` around a model in memory (evaluated where it is), or loading a path or hub id; and
    the model's name for the results."""
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, os.PathLike)):
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        lm = HFLM(
            pretrained=str(model),
            tokenizer=tokenizer,
            backend="causal",
            device=device,
            batch_size=batch_size,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
        )
        return lm, str(model)
    if tokenizer is None:
        raise ZeroShotError("evaluating a model in memory needs its tokenizer; pass tokenizer=")
    model.eval()
    lm = HFLM(
        pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length
    )
    return lm, getattr(model, "name_or_path", "") or type(model).__name__


def _task_manager(
    names: list[str],
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None,
    include_defaults: bool,
) -> Any:
    """lm-eval's task index, with the local task directories; every name must be in it."""
    from lm_eval.tasks import TaskManager

    paths = [
        str(p)
        for p in ([include_path] if isinstance(include_path, (str, os.PathLike)) else include_path or [])
    ]
    manager = None
    if paths and include_defaults:
        # Indexing lm-eval's thousands of built-in task files takes a while: skip it when the local tasks suffice.
        local = TaskManager(include_path=paths, include_defaults=False)
        manager = local if all(name in local.all_tasks for name in names) else None
    manager = manager or TaskManager(include_path=paths or None, include_defaults=include_defaults)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ZeroShotError(
            f"unknown lm-eval task(s) {unknown}; check the spelling (`lm_eval ls tasks`) or pass include_path= "
            "for local task YAMLs"
        )
    return manager


def evaluate_tasks(
    model: Any,
    tokenizer: Any = None,
    tasks: str | Sequence[str] = PAPER_TASKS,
    *,
    num_fewshot: int = 0,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    device: str | None = None,
    max_length: int | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    metrics: Mapping[str, str] | None = None,
    trust_remote_code: bool = False,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` and return each task's reported metric and their average.

    Args:
        model: a causal LM in memory (a ``PreTrainedModel``, evaluated where it is), or a checkpoint path or
            hub id that lm-eval loads itself. ``trust_remote_code`` stays off unless asked for: a sliced
            checkpoint loads with this package's own classes, and a checkpoint's code must never run unasked.
        tokenizer: the model's tokenizer; loaded from ``model`` when it is a path.
        tasks: lm-eval task names (``"piqa,winogrande"`` or a list; ``"paper"`` = the paper's five).
        num_fewshot: examples in context (the paper: 0).
        batch_size: lm-eval batch size (an int, or ``"auto"``).
        limit: examples per task (an int, or a fraction < 1); for quick checks only.
        device: where lm-eval loads a path ``model`` (default: cuda if present).
        max_length: context length (default: the model config's).
        include_path: extra directories of task YAMLs (local tasks with local data files).
        include_defaults: also index lm-eval's built-in tasks (indexing them takes a while).
        metrics: per-task metric overrides, e.g. ``{"mytask": "acc"}``.
        bootstrap_iters: bootstrap resamples for stderrs of non-mean metrics (mean metrics use a formula).
        seed: lm-eval's random seeds (few-shot sampling).

    Returns:
        ``{"tasks": {task: {"metric", "value", "stderr", "samples", "dataset_path", "dataset_name", "split"}},
        "average", "num_fewshot", "limit", "lm_eval_version", "model"}``.
    """
    lm_eval = require_lm_eval()
    names = parse_tasks(tasks)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ZeroShotError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    lm, model_name = _harness_model(model, tokenizer, device, batch_size, max_length, trust_remote_code)
    manager = _task_manager(names, include_path, include_defaults)
    logger.info(
        "lm-eval %s on %s: %s (%d-shot)", lm_eval.__version__, model_name, ", ".join(names), num_fewshot
    )
    try:
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as exc:
        if _is_unreachable_dataset(exc):
            raise offline_task_error(names, exc) from exc
        raise
    if raw is None:  # a non-zero rank under torch.distributed
        return {}
    return parse_results(raw, names, metrics=metrics, model=model_name, num_fewshot=num_fewshot, limit=limit)


def evaluate_checkpoint(
    source: str,
    tasks: str | Sequence[str] = PAPER_TASKS,
    *,
    dtype: str | None = None,
    device: str | None = None,
    save: bool = False,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load ``source`` like every hf-slicegpt command (hub id, directory, ``.gguf``, ``smollm2``) and run
    :func:`evaluate_tasks` on it in memory; ``save`` writes ``zeroshot_results.json`` into a checkpoint
    directory, where its model card picks the results up. ``kwargs`` go to :func:`evaluate_tasks`.
    """
    import gc

    import torch

    from .loading import load_model_and_tokenizer

    parse_tasks(tasks)  # fail on a malformed list before loading
    if save and not (Path(source) / "config.json").is_file():
        raise ZeroShotError(f"saving results needs a checkpoint directory, got {source!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(
        source, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    if tokenizer is None:
        raise ZeroShotError(f"model {source!r} has no tokenizer; lm-eval needs one")
    result = evaluate_tasks(model, tokenizer, tasks, **kwargs)
    result["model"] = source
    del model
    gc.collect()
    if save:
        logger.info("Wrote %s", save_results(result, source))
    return result


def parse_results(
    raw: Mapping[str, Any],
    tasks: Sequence[str],
    *,
    metrics: Mapping[str, str] | None = None,
    model: str | None = None,
    num_fewshot: int = 0,
    limit: int | float | None = None,
) -> dict[str, Any]:
    """Reduce lm-eval's ``simple_evaluate`` output to one metric per task and their average."""
    results = {**(raw.get("groups") or {}), **(raw.get("results") or {})}
    configs = raw.get("configs") or {}
    samples = raw.get("n-samples") or {}
    scores: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task not in results:
            raise ZeroShotError(f"lm-eval returned no result for task {task!r}")
        task_metrics = results[task]
        metric = primary_metric(task, task_metrics, metrics)
        config = configs.get(task) or {}
        count = samples.get(task) or {}
        scores[task] = {
            "metric": metric,
            "value": _as_float(_metric_value(task_metrics, metric)) if metric else None,
            "stderr": _as_float(_metric_value(task_metrics, f"{metric}_stderr")) if metric else None,
            # Every other accuracy-like metric the task reports (PIQA: acc beside acc_norm), never averaged.
            "also": {
                name: {
                    "value": _as_float(_metric_value(task_metrics, name)),
                    "stderr": _as_float(_metric_value(task_metrics, f"{name}_stderr")),
                }
                for name in _other_metrics(task_metrics, metric)
            },
            "samples": count.get("effective", count.get("original")),
            "dataset_path": config.get("dataset_path"),
            "dataset_name": config.get("dataset_name"),
            "split": config.get("test_split") or config.get("validation_split"),
        }
    values = [s["value"] for s in scores.values() if s["value"] is not None]
    return {
        "tasks": scores,
        "average": sum(values) / len(values) if values else None,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval_version": raw.get("lm_eval_version") or _lm_eval_version(),
        "model": model,
    }


def _lm_eval_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table: one row per task and metric (value, stderr), then the average.

    A task that reports several metrics (PIQA: ``acc`` and ``acc_norm``) gets a row for each; the one in the
    average (the paper's choice) is marked ``*``.
    """

    def cells(task: str, metric: str, value: Any, stderr: Any) -> tuple[str, str, str, str]:
        return (
            task,
            metric,
            "-" if value is None else f"{value:.4f}",
            "-" if stderr is None else f"±{stderr:.4f}",
        )

    tasks = result.get("tasks") or {}
    several = any(score.get("also") for score in tasks.values())
    mark = "*" if several else ""
    rows = [("task", "metric", "value", "stderr")]
    for task, score in tasks.items():
        metric = score.get("metric") or "-"
        rows.append(
            cells(
                task, metric + (mark if score.get("metric") else ""), score.get("value"), score.get("stderr")
            )
        )
        for name, other in (score.get("also") or {}).items():
            rows.append(cells(task, name, other.get("value"), other.get("stderr")))
    average = result.get("average")
    rows.append(("average" + mark, "", "-" if average is None else f"{average:.4f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    if several:
        lines.append("* the metric averaged (the paper's choice per task)")
    return "\n".join(line.rstrip() for line in lines)


def save_results(result: Mapping[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``zeroshot_results.json`` into a checkpoint directory, where its model card picks it up."""
    path = Path(directory) / RESULTS_NAME
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


__all__ = [
    "PAPER_TASKS",
    "PRIMARY_METRICS",
    "RESULTS_NAME",
    "ZeroShotError",
    "evaluate_checkpoint",
    "evaluate_tasks",
    "format_table",
    "offline_task_error",
    "parse_results",
    "parse_tasks",
    "primary_metric",
    "require_lm_eval",
    "save_results",
]
