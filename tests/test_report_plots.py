"""The report's plots draw the data they claim to: each figure's series are read back before it is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import calibration, make_tiny

import hf_slicegpt
from hf_slicegpt.checkpoint import report as reporting

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every figure saved, by file name, with its axes' lines (x, y, colour, style) captured at save time."""
    from matplotlib.figure import Figure

    saved: dict[str, Any] = {}
    original = Figure.savefig

    def capture(self: Figure, path: Any, *args: Any, **kwargs: Any) -> Any:
        saved[Path(path).name] = [
            {
                "lines": [
                    {
                        "x": np.asarray(line.get_xdata(), dtype=float),
                        "y": np.asarray(line.get_ydata(), dtype=float),
                        "color": line.get_color(),
                        "style": line.get_linestyle(),
                    }
                    for line in ax.get_lines()
                ],
                "title": ax.get_title(),
                "yscale": ax.get_yscale(),
                "visible": ax.get_visible(),
            }
            for ax in self.axes
        ]
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return saved


@pytest.fixture(scope="module")
def stats() -> list[Any]:
    torch.set_num_threads(1)
    sliced = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, show_progress=False)
    return sliced.slicing_stats


def test_spectra_plots_draw_every_signal(stats, figures, tmp_path) -> None:
    paths = reporting.plot_spectra(stats, tmp_path)
    assert sorted(p.name for p in paths) == sorted(figures) and all(p.is_file() for p in paths)
    assert len(stats) == 5  # embeddings, then attention output and output of 2 layers

    # cumulative variance: one curve per signal, the cumulative share of its eigenvalues; red: the kept width
    axes = figures["cumulative_variance.png"][0]
    curves = [line for line in axes["lines"] if line["style"] == "-"]
    marks = [line for line in axes["lines"] if line["style"] == "--"]
    assert len(curves) == len(stats)
    for curve, s in zip(curves, stats):
        values = np.asarray(s.eigenvalues)
        np.testing.assert_allclose(curve["x"], np.arange(1, s.width + 1))
        np.testing.assert_allclose(curve["y"], np.cumsum(values) / values.sum(), rtol=1e-9)
        assert curve["y"][s.kept_width - 1] == pytest.approx(s.explained_variance, rel=1e-9)
    assert [mark["x"][0] for mark in marks] == [24] and all(m["color"] == "red" for m in marks)

    # the kept share per signal, in order
    (axes,) = figures["explained_variance.png"]
    (line,) = axes["lines"]
    np.testing.assert_allclose(line["y"], [s.explained_variance for s in stats])

    # one panel per signal: its eigenvalues (log scale) and its kept width
    panels = [ax for ax in figures["spectra_00.png"] if ax["visible"]]
    assert [p["title"].splitlines()[0] for p in panels] == [s.name for s in stats]
    for panel, s in zip(panels, stats):
        spectrum, mark = panel["lines"]
        assert panel["yscale"] == "log"
        np.testing.assert_allclose(spectrum["y"], np.clip(s.eigenvalues, 1e-30, None))
        assert mark["x"][0] == s.kept_width


def test_perplexity_plot_draws_each_model_at_its_sparsity(figures, tmp_path) -> None:
    points = [
        reporting.PerplexityPoint("b", 0.25, 14.0),
        reporting.PerplexityPoint("a", 0.0, 10.0),
        reporting.PerplexityPoint("c", 0.5, 40.0),
    ]
    path = reporting.plot_perplexity_vs_sparsity(points, tmp_path / "ppl.png", data="pydocs")
    assert path.is_file()
    (axes,) = figures["ppl.png"]
    (line,) = axes["lines"]
    np.testing.assert_allclose(line["x"], [0, 25, 50])  # sorted by sparsity, in percent
    np.testing.assert_allclose(line["y"], [10.0, 14.0, 40.0])
    assert axes["yscale"] == "log"


def test_a_plot_file_that_cannot_be_written_is_refused_up_front(tmp_path) -> None:
    assert reporting.check_plot_file(tmp_path / "new" / "ppl.png") == tmp_path / "new" / "ppl.png"
    assert not (tmp_path / "new").exists()  # checked, not created
    reporting.check_plot_file(tmp_path / "ppl.PDF")
    with pytest.raises(
        ValueError, match=r"format 'xyz' is not one matplotlib writes \(.*png.*\); name it e.g. p.png"
    ):
        reporting.check_plot_file(tmp_path / "p.xyz")
    with pytest.raises(ValueError, match="no format"):
        reporting.check_plot_file(tmp_path / "plot")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        reporting.check_plot_file(tmp_path / "dir.png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        reporting.check_plot_file(tmp_path / "afile" / "ppl.png")


def test_eval_checks_its_plot_file_before_loading_any_model(tmp_path, capsys) -> None:
    """A bad --plot fails in a second, naming the file, not after every model is evaluated."""
    from hf_slicegpt import cli

    code = cli.main(
        [
            "-q",
            "eval",
            str(tmp_path / "no-such-model"),
            "--data",
            "pydocs",
            "--json",
            "--plot",
            str(tmp_path / "p.xyz"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "p.xyz" in err and "format 'xyz'" in err and "no-such-model" not in err
