"""The ``hf-slicegpt`` command line, driven as a user drives it: tiny checkpoints on disk, local text, pydocs.

The main path runs in subprocesses (real exit codes, real stderr). The many error cases run ``main()``
in-process, which is the same code the console script calls, to keep this file fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
from cli_helpers import run_cli, save_tiny_checkpoint, single_thread, write_corpus

from hf_slicegpt import cli
from hf_slicegpt.checkpoint import report as reporting
from hf_slicegpt.workflows import data

SEQ = ["--num-samples", "8", "--seq-len", "32"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "dense": save_tiny_checkpoint(root / "dense"),
        "corpus": write_corpus(root / "corpus.txt"),
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def _offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_SLICEGPT_CACHE", str(tmp_path / "cache"))


def run_main(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ main path


def test_slice_then_eval_info_generate(work: dict[str, Path]) -> None:
    root, dense, corpus = work["root"], work["dense"], work["corpus"]
    out = root / "sliced"
    proc = run_cli(
        "slice", dense, "--sparsity", "0.25", "--output", out, "--calibration", "pydocs", *SEQ,
        "--eval-data", corpus, "--plots", tmp=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Slicing layers" in proc.stderr  # progress bars by default
    assert "Sliced" in proc.stdout and "parameters" in proc.stdout and "perplexity" in proc.stdout

    for name in ("config.json", "model.safetensors", "tokenizer.json", "slicing_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "slicing_report.json").read_text())
    assert report["settings"]["calibration"] == "pydocs"
    assert report["settings"]["sparsity"] == 0.25 and report["settings"]["num_samples"] == 8
    assert report["slicing"]["calibration_sequences"] == 8
    assert [row["attn_input_dim"] for row in report["layers"]] == [24, 24]  # 32 * 0.75
    params = report["parameters"]
    assert params["sliced"] < params["dense"]
    ppl = report["perplexity"]
    assert ppl["data"] == str(corpus) and ppl["seq_len"] == 32
    assert 1 < ppl["dense"] < 1e4 and 1 < ppl["sliced"] < 1e4
    assert report["seconds"]["slicing"] > 0 and report["peak_memory"]["max_rss_bytes"] > 10 * 2**20
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    # embeddings + (attention output, layer output) per layer: every signal, with its kept share of variance
    assert len(report["signals"]) == 1 + 2 * 2
    assert all(0 < s["explained_variance"] <= 1 and s["kept_width"] == 24 for s in report["signals"])
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert {"cumulative_variance.png", "explained_variance.png", "spectra_00.png"} <= set(pngs)
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # eval --json on the sliced and the dense checkpoint reproduces the report's numbers
    plot = root / "ppl.png"
    proc = run_cli(
        "eval", out, dense, "--data", corpus, "--seq-len", "32", "--json", "--plot", plot, tmp=root
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["model"] for r in rows] == [str(out), str(dense)]
    assert rows[0]["perplexity"] == pytest.approx(ppl["sliced"], rel=1e-4)
    assert rows[1]["perplexity"] == pytest.approx(ppl["dense"], rel=1e-4)
    assert [r["sparsity"] for r in rows] == [0.25, 0.0]
    assert rows[0]["tokens"] == ppl["tokens"] and rows[0]["seq_len"] == 32 and rows[0]["data"] == str(corpus)
    assert math.isclose(rows[0]["perplexity"], math.exp(rows[0]["nll"]), rel_tol=1e-9)
    assert plot.read_bytes()[:4] == b"\x89PNG"

    proc = run_cli("info", out, "--json", tmp=root)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    # counted from the safetensors headers: must equal the in-memory count written at slicing time
    assert info["parameters"]["sliced"] == params["sliced"]
    assert info["slicing"]["sparsity"] == 0.25 and info["tied_embeddings"] is True
    assert [row["output_dim"] for row in info["layers"]] == [24, 24]

    proc = run_cli("generate", out, "--prompt", "The list", "--max-new-tokens", "6", tmp=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The list") and len(proc.stdout.strip()) > len("The list")


def test_info_text_and_quiet_slice(work: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = work["root"] / "quiet"
    code, stdout, stderr = run_main(
        capsys, "slice", work["dense"], "--sparsity", "0.5", "-o", out, "--calibration", work["corpus"], *SEQ,
        "--round-to", "4", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    assert stderr == ""  # no progress bars, no INFO logs
    assert "Sliced" in stdout
    code, stdout, stderr = run_main(capsys, "info", out)
    assert code == 0, stderr
    assert "sparsity        50%" in stdout and "round-to 4" in stdout
    assert "layer  attn_in  mlp_in     out" in stdout
    assert "     0       16      16      16" in stdout


def test_demo_on_a_tiny_model(work: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = work["root"] / "demo"
    code, stdout, stderr = run_main(
        capsys, "demo", "--model", work["dense"], "--output", out, *SEQ, "--max-new-tokens", "4", "-q"
    )
    assert code == 0, stderr
    assert "perplexity" in stdout and "on pydocs (held-out" in stdout
    assert "Reloaded with AutoModelForCausalLM.from_pretrained: SlicedModelForCausalLM" in stdout
    assert "Generated (greedy): Python is a programming language that" in stdout
    assert (out / "slicing_report.json").is_file()
    # a second demo run refuses to clobber the first unless asked
    code, _, stderr = run_main(capsys, "demo", "--model", work["dense"], "--output", out, *SEQ, "-q")
    assert code == 1 and "--overwrite" in stderr


# ------------------------------------------------------------------------------------------ errors


def _error_cases(work: dict[str, Path]) -> list[tuple[list[Any], list[str]]]:
    dense, corpus, root = work["dense"], work["corpus"], work["root"]
    base = ["slice", dense, "--output", root / "never", *SEQ]
    return [
        ([*base, "--sparsity", "150", "--calibration", corpus], ["sparsity must be in [0, 1)", "150"]),
        ([*base, "--sparsity", "25", "--calibration", corpus], ["looks like a percentage", "0.25"]),
        ([*base, "--sparsity", "-0.1", "--calibration", corpus], ["sparsity must be in [0, 1)"]),
        (
            [*base, "--sparsity", "0.25", "--calibration", corpus, "--broad-mix", "0.7"],
            ["broad mix", "0.7", "0 to turn it off"],
        ),
        (
            [*base, "--sparsity", "0.25", "--calibration", corpus, "--correction-fraction", "0"],
            ["correction_fraction must be in (0, 1]", "0.25"],
        ),
        (
            [*base, "--sparsity", "0.25", "--calibration", root / "missing.txt"],
            ["missing.txt", "does not exist"],
        ),
        ([*base, "--sparsity", "0.25", "--calibration", "wikitext2"], ["could not load dataset", "pydocs"]),
        (
            [*base, "--sparsity", "0.25", "--calibration", "someorg/nosuchdata"],
            ["'someorg/nosuchdata'", "pydocs"],
        ),
        (
            [
                *base[:-4],
                "--num-samples",
                "5000",
                "--seq-len",
                "32",
                "--sparsity",
                "0.25",
                "--calibration",
                corpus,
            ],
            ["not enough text", "160000 tokens needed", "the source has"],
        ),
        (
            ["slice", root / "no-model", "--sparsity", "0.25", "-o", root / "never", "--calibration", corpus],
            ["no-model", "does not exist"],
        ),
        (["eval", dense, "--data", root / "nope.txt"], ["nope.txt", "does not exist"]),
        ([*base, "--sparsity", "0.25", "--calibration", corpus, "--device", "cuda:99"], ["'cuda:99'"]),
        ([*base, "--sparsity", "0.25", "--calibration", corpus, "--device", "toaster"], ["unknown device"]),
        (["info", dense], ["dense 'llama' model, not a sliced one"]),
        (["info", root / "nowhere"], ["does not exist"]),
        (["generate", root / "nowhere", "--prompt", "x"], ["does not exist"]),
    ]


def test_each_error_is_one_line_without_traceback(
    work: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, needles in _error_cases(work):
        code, stdout, stderr = run_main(capsys, *argv, "--quiet")
        lines = stderr.strip().splitlines()
        assert code == 1, (argv, stderr)
        assert len(lines) == 1 and lines[0].startswith("hf-slicegpt: error: "), (argv, stderr)
        assert "Traceback" not in stderr
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert not (work["root"] / "never").exists()  # no failed run left a directory


def test_error_in_a_subprocess(work: dict[str, Path]) -> None:
    """The console entry point's real exit status and stderr: an online source while offline."""
    root = work["root"]
    proc = run_cli(
        "slice", work["dense"], "--sparsity", "0.25", "-o", root / "never", "--calibration", "wikitext2", tmp=root
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-slicegpt: error: could not load dataset 'wikitext'") and "pydocs" in last
    assert not (root / "never").exists()


def test_verbose_traceback_and_usage_errors(
    work: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = run_main(capsys, "info", work["dense"], "--verbose")
    assert (
        code == 1
        and "Traceback" in stderr
        and stderr.strip().splitlines()[-1].startswith("hf-slicegpt: error:")
    )
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage errors keep their status 2
        cli.main(["slice", str(work["dense"]), "--output", str(work["root"] / "x")])
    assert exit_info.value.code == 2 and "--sparsity" in capsys.readouterr().err
    assert not (work["root"] / "x").exists()
    for command in ("slice", "demo"):  # a percentage is answered with the fraction to pass
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--sparsity", "25%", "--output", str(work["root"] / "x")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "'25%' is a percentage" in err and "e.g. 0.25" in err


def test_unsupported_family_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(
            n_embd=32, n_layer=1, n_head=2, vocab_size=1024, n_positions=64, bos_token_id=0, eos_token_id=1
        )
    ).save_pretrained(model_dir)
    from cli_helpers import tiny_tokenizer, write_corpus

    tiny_tokenizer().save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "c.txt", 20_000)
    capsys.readouterr()  # drop the save's progress bars
    code, _, stderr = run_main(
        capsys,
        "slice",
        model_dir,
        "--sparsity",
        "0.2",
        "-o",
        tmp_path / "out",
        "--calibration",
        corpus,
        *SEQ,
        "-q",
    )
    assert code == 1 and "gpt2" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ output dir


def test_overwrite_refusal_and_failed_write_leaves_nothing(
    work: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = work["root"] / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = [
        "slice",
        work["dense"],
        "--sparsity",
        "0.25",
        "-o",
        out,
        "--calibration",
        work["corpus"],
        *SEQ,
        "-q",
    ]
    code, _, stderr = run_main(capsys, *args)
    assert code == 1 and "exists and is not empty" in stderr and "--overwrite" in stderr
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only a checkpoint hf-slicegpt wrote: this is not one yet
    code, _, stderr = run_main(capsys, *args, "--overwrite")
    assert code == 1 and "replaces only" in stderr and (out / "keep.txt").read_text() == "precious"
    (out / "slicing_report.json").write_text("{}")  # now it is (an older sliced checkpoint, say)

    def disk_full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    # a failure while writing: the old directory stays as it was, no temporary sibling is left behind
    monkeypatch.setattr(reporting, "write_report", disk_full)
    code, _, stderr = run_main(capsys, *args, "--overwrite")
    assert code == 1 and "No space left on device" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "slicing_report.json"]
    fresh = work["root"] / "fresh"
    code, _, _ = run_main(capsys, *args[:5], fresh, *args[6:])
    assert code == 1 and not fresh.exists()
    assert not [p for p in work["root"].iterdir() if p.name.startswith((".existing", ".fresh"))]

    monkeypatch.undo()
    code, _, stderr = run_main(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and json.loads((out / "slicing_report.json").read_text())["layers"]


# ------------------------------------------------------------------------------------------ hub sources


def test_hub_source_options_reach_datasets(
    work: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub boundary is faked: the CLI asks for the right id, config and split, and reads the column."""
    calls: list[tuple[str, dict[str, Any]]] = []
    rows = [p for p in work["corpus"].read_text().split("\n\n") if p.strip()]

    def fake_load_dataset(path: str, *args: Any, **kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:
        calls.append((path, kwargs))
        table = datasets.Dataset.from_dict({"body": rows, "id": list(range(len(rows)))})
        return table if "split" in kwargs else datasets.DatasetDict(train=table)

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    out = work["root"] / "hub"
    code, _, stderr = run_main(
        capsys, "slice", work["dense"], "--sparsity", "0.25", "-o", out, "--calibration", "someorg/corpus",
        "--text-column", "body", "--split", "train[:90%]", "--subset", "en", *SEQ, "-q",
    )  # fmt: skip
    assert code == 0, stderr
    assert calls and all(c == ("someorg/corpus", {"name": "en", "split": "train[:90%]"}) for c in calls)
    settings = json.loads((out / "slicing_report.json").read_text())["settings"]
    assert (settings["calibration"], settings["text_column"], settings["subset"]) == (
        "someorg/corpus",
        "body",
        "en",
    )

    code, _, stderr = run_main(
        capsys, "slice", work["dense"], "--sparsity", "0.25", "-o", work["root"] / "hub2",
        "--calibration", "someorg/corpus", "--text-column", "text", *SEQ, "-q",
    )  # fmt: skip
    assert code == 1 and "no column 'text'" in stderr and "body" in stderr


# ------------------------------------------------------------------------------------------ registry


def test_every_registered_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    help_text = parser.format_help()
    for name in cli.SUBCOMMANDS:
        assert name in help_text
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: hf-slicegpt {name}" in capsys.readouterr().out
