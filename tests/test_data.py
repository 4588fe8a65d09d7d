"""Tests for hf_slicegpt.workflows.data: sources, hold-out, windows. Offline: Hub calls are faked."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hf_slicegpt.workflows import data
from hf_slicegpt.workflows.data import DataSourceError

PYDOCS_TEXT = "\n\n".join(topics[k] for k in sorted(topics))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained in-process on pydocs; its post-processor adds BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([PYDOCS_TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def _paragraphs(n: int, tag: str = "para") -> list[str]:
    return [f"{tag} {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(n)]


def _decode(tokenizer: PreTrainedTokenizerFast, row: torch.Tensor) -> str:
    """Text of a window; a window edge may split a multi-byte character, so drop those."""
    return tokenizer.decode(row).strip("\ufffd")


def _row_offsets(rows: torch.Tensor, stream: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row inside ``stream`` (each row must be an aligned window of it)."""
    grid = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    found = []
    for row in rows:
        hits = (grid == row).all(dim=1).nonzero().flatten().tolist()
        assert hits, "row is not an aligned window of the token stream"
        found.append(hits[0])
    return found


@pytest.fixture(autouse=True)
def _guard_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only local builders may reach the real ``load_dataset``: a Hub call in a test is a bug."""
    real = data.load_dataset

    def guarded(path: str, *args: Any, **kwargs: Any) -> Any:
        if path not in ("json", "parquet"):
            raise AssertionError(f"test tried to load {path!r} from the Hub")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_dataset", guarded)


# ------------------------------------------------------------------------------------ pydocs


def test_pydocs_hold_out_is_a_topic_boundary_partition() -> None:
    calib = data.load_text("pydocs", purpose="calibration")
    held = data.load_text("pydocs", purpose="evaluation")
    assert PYDOCS_TEXT.endswith(held)
    assert 0.05 < len(held) / len(PYDOCS_TEXT) <= 0.1
    head = PYDOCS_TEXT[: len(PYDOCS_TEXT) - len(held)]
    assert calib.startswith(topics[sorted(topics)[0]][:1000])
    calib_paragraphs = calib.split("\n\n")
    assert all(p in head for p in calib_paragraphs)  # calibration comes from the head only
    # pydoc repeats itself ("compound" holds "while"): repeated paragraphs leave calibration
    held_paragraphs = {p.strip() for p in held.split("\n\n")} - {""}
    assert not held_paragraphs & {p.strip() for p in calib_paragraphs}
    assert len(calib) > 0.85 * len(PYDOCS_TEXT)
    assert any(held.startswith(topics[k]) for k in topics), "held-out part must start at a topic"
    assert topics[sorted(topics)[-1]] not in calib


def test_pydocs_calibration_windows_never_touch_held_out(tokenizer: PreTrainedTokenizerFast) -> None:
    seq_len = 256
    calib_ids = data.tokenize_text(tokenizer, data.load_text("pydocs", purpose="calibration"))
    n_windows = calib_ids.numel() // seq_len
    rows = data.calibration_tokens(tokenizer, "pydocs", num_samples=n_windows, seq_len=seq_len, seed=0)
    assert rows.shape == (n_windows, seq_len)
    # every window (the last one included) is an aligned window of the calibration stream only
    assert _row_offsets(rows, calib_ids, seq_len) == list(range(n_windows))
    calib = data.load_text("pydocs", purpose="calibration")
    held = data.load_text("pydocs", purpose="evaluation")
    for row in rows:
        text = _decode(tokenizer, row)
        assert text in calib and text not in held
    evaluation = data.evaluation_tokens(tokenizer, "pydocs", seq_len=seq_len)
    assert evaluation.shape[0] >= 10
    for row in evaluation:
        text = _decode(tokenizer, row)
        assert text in held and text not in calib


def test_pydocs_ignores_split(caplog: pytest.LogCaptureFixture) -> None:
    assert data.load_text("pydocs", purpose="calibration", split="test") == data.load_text(
        "pydocs", purpose="calibration"
    )
    assert "fixed hold-out" in caplog.text


# ------------------------------------------------------------------------------- tokenizing


def test_tokenize_text_chunked_equals_whole_and_has_no_bos(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = data.load_text("pydocs", purpose="evaluation")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(data, "_CHUNK_CHARS", 1000)
    assert len(data._chunk_text(text, 1000)) > 20
    assert "".join(data._chunk_text(text, 1000)) == text
    chunked = data.tokenize_text(tokenizer, text, show_progress=False)
    assert chunked.dtype == torch.long and chunked.dim() == 1
    assert chunked.tolist() == whole
    assert tokenizer.bos_token_id not in chunked.tolist()
    capped = data.tokenize_text(tokenizer, text, max_tokens=500, show_progress=False)
    assert 500 <= capped.numel() < len(whole)


# ---------------------------------------------------------------------------------- windows


def test_windows_seeded_sorted_non_overlapping() -> None:
    ids = torch.arange(1000)
    rows = data.windows(ids, 10, 7, seed=3)
    assert rows.shape == (7, 10) and rows.dtype == torch.long
    starts = rows[:, 0].tolist()
    assert all(s % 10 == 0 for s in starts)
    assert starts == sorted(starts) and len(set(starts)) == 7
    assert torch.equal(rows, rows[:, :1] + torch.arange(10))
    assert torch.equal(rows, data.windows(ids, 10, 7, seed=3))
    assert not torch.equal(rows, data.windows(ids, 10, 7, seed=4))
    assert data.windows(ids, 10, 3, seed=None)[:, 0].tolist() == [0, 10, 20]


def test_windows_all_in_order_drops_tail() -> None:
    rows = data.windows(torch.arange(105), 10, None, None)
    assert rows.shape == (10, 10)
    assert torch.equal(rows.flatten(), torch.arange(100))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 1, "num_samples": 1}, "seq_len must be an integer >= 2"),
        ({"seq_len": 4, "num_samples": 0}, "num_samples must be an integer >= 1"),
    ],
)
def test_windows_validates(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        data.windows(torch.arange(100), kwargs["seq_len"], kwargs["num_samples"], 0)


def test_windows_rejects_2d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        data.windows(torch.zeros(2, 8, dtype=torch.long), 4, None, None)


def test_calibration_is_deterministic_by_seed(tokenizer: PreTrainedTokenizerFast) -> None:
    kwargs: dict[str, Any] = {"num_samples": 8, "seq_len": 128}
    a = data.calibration_tokens(tokenizer, "pydocs", seed=1, **kwargs)
    b = data.calibration_tokens(tokenizer, "pydocs", seed=1, **kwargs)
    c = data.calibration_tokens(tokenizer, "pydocs", seed=2, **kwargs)
    assert a.shape == (8, 128)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    stream = data.tokenize_text(tokenizer, data.load_text("pydocs", purpose="calibration"))
    for rows in (a, c):
        offsets = _row_offsets(rows, stream, 128)
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


def test_calibration_validates_before_loading(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        data.calibration_tokens(tokenizer, "./missing.txt", num_samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.calibration_tokens(tokenizer, "./missing.txt", seq_len=1)


def test_too_little_text_says_what_is_needed(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(_paragraphs(40)), encoding="utf-8")
    have = data.tokenize_text(tokenizer, data.load_text(str(path), purpose="calibration")).numel()
    with pytest.raises(DataSourceError) as info:
        data.calibration_tokens(tokenizer, str(path), num_samples=1000, seq_len=64)
    message = str(info.value)
    assert "64000 tokens needed" in message and f"has {have}" in message
    assert "fewer samples" in message and "shorter seq-len" in message


def test_evaluation_max_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    full = data.evaluation_tokens(tokenizer, "pydocs", seq_len=64)
    capped = data.evaluation_tokens(tokenizer, "pydocs", seq_len=64, max_tokens=64 * 5 + 10)
    assert torch.equal(capped, full[:5])
    with pytest.raises(ValueError, match="max_tokens"):
        data.evaluation_tokens(tokenizer, "pydocs", seq_len=64, max_tokens=10)


# ------------------------------------------------------------------------------ local files


def test_local_txt_hold_out(tmp_path: Path) -> None:
    text = "\n\n".join(_paragraphs(100))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    calib = data.load_text(str(path), purpose="calibration")
    held = data.load_text(str(path), purpose="evaluation")
    assert text.startswith(calib) and text.endswith(held)
    assert held.startswith("para ") and len(calib) + len(held) < len(text)
    assert 0.05 < len(held) / len(text) <= 0.1
    assert data.load_text(str(path), purpose="evaluation", split="all") == text
    with pytest.raises(DataSourceError, match="split='all'"):
        data.load_text(str(path), purpose="evaluation", split="test")


def test_local_txt_without_paragraphs_cuts_at_a_line(tmp_path: Path) -> None:
    text = "\n".join(_paragraphs(100))
    path = tmp_path / "lines.txt"
    path.write_text(text, encoding="utf-8")
    held = data.load_text(str(path), purpose="evaluation")
    assert held.startswith("para ") and text.endswith(held)


def test_local_directory_of_txt_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert data.load_text(str(tmp_path), purpose="calibration", split="all") == "first file\n\nsecond file"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="no .txt files"):
        data.load_text(str(empty), purpose="calibration")


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_local_tabular_files(tmp_path: Path, suffix: str) -> None:
    paragraphs = _paragraphs(50)
    rows = [{"text": p, "body": p.upper(), "n": i} for i, p in enumerate(paragraphs)]
    path = tmp_path / f"rows{suffix}"
    _write_rows(path, rows)
    assert data.load_text(str(path), purpose="calibration", split="all") == "\n\n".join(paragraphs)
    assert data.load_text(str(path), purpose="calibration", split="train", text_column="body") == "\n\n".join(
        p.upper() for p in paragraphs
    )
    calib = data.load_text(str(path), purpose="calibration")
    held = data.load_text(str(path), purpose="evaluation")
    assert held.split("\n\n")[0] in paragraphs  # cut at a row boundary
    assert set(calib.split("\n\n")).isdisjoint(held.split("\n\n"))
    with pytest.raises(DataSourceError) as info:
        data.load_text(str(path), purpose="calibration", text_column="content")
    message = str(info.value)
    assert "'content'" in message and "'body'" in message and "'text'" in message and "text_column" in message
    with pytest.raises(DataSourceError, match="not text"):
        data.load_text(str(path), purpose="calibration", text_column="n")


def test_local_calibration_tokens_from_jsonl(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    _write_rows(path, [{"text": p} for p in _paragraphs(300)])
    rows = data.calibration_tokens(tokenizer, str(path), num_samples=4, seq_len=64, seed=0)
    assert rows.shape == (4, 64)


@pytest.mark.parametrize("source", ["./no/such/file.txt", "missing_corpus.jsonl", "/nonexistent/dir"])
def test_missing_local_path_is_named(source: str) -> None:
    with pytest.raises(DataSourceError, match="does not exist") as info:
        data.load_text(source, purpose="calibration")
    assert repr(source) in str(info.value)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"unsupported file type '\.csv'"):
        data.load_text(str(path), purpose="calibration")


def test_empty_source_string() -> None:
    with pytest.raises(DataSourceError, match="non-empty"):
        data.load_text("  ", purpose="calibration")


def test_bad_purpose() -> None:
    with pytest.raises(ValueError, match="purpose"):
        data.load_text("pydocs", purpose="training")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ Hub (faked boundary)


class FakeHub:
    """Stands in for ``datasets.load_dataset``: records calls, returns in-memory datasets."""

    def __init__(self, columns: dict[str, list[Any]], splits: tuple[str, ...] = ("train",)) -> None:
        self.columns = columns
        self.splits = splits
        self.calls: list[dict[str, Any]] = []

    def __call__(self, path: str, name: str | None = None, **kwargs: Any) -> Any:
        self.calls.append({"path": path, "name": name, **kwargs})
        split = kwargs.get("split")
        if split is None:
            return datasets.DatasetDict(
                {
                    s: datasets.Dataset.from_dict(
                        {k: [f"{s}:{v}" for v in vs] for k, vs in self.columns.items()}
                    )
                    for s in self.splits
                }
            )
        return datasets.Dataset.from_dict(self.columns)


@pytest.mark.parametrize(
    ("preset", "purpose", "path", "name", "split", "column"),
    [
        ("wikitext2", "calibration", "wikitext", "wikitext-2-raw-v1", "train", "text"),
        ("wikitext2", "evaluation", "wikitext", "wikitext-2-raw-v1", "test", "text"),
        ("ptb", "calibration", "ptb_text_only", "penn_treebank", "train", "sentence"),
        ("ptb", "evaluation", "ptb_text_only", "penn_treebank", "test", "sentence"),
    ],
)
def test_presets_request_reference_datasets(
    monkeypatch: pytest.MonkeyPatch, preset: str, purpose: str, path: str, name: str, split: str, column: str
) -> None:
    fake = FakeHub({column: ["alpha", "beta"], "other": ["x", "y"]})
    monkeypatch.setattr(data, "load_dataset", fake)
    assert data.load_text(preset.upper(), purpose=purpose) == "alpha\n\nbeta"  # type: ignore[arg-type]
    assert fake.calls == [{"path": path, "name": name, "split": split}]


@pytest.mark.parametrize(
    ("purpose", "split", "data_file"),
    [
        ("calibration", "train", "en/c4-train.00000-of-01024.json.gz"),
        ("evaluation", "validation", "en/c4-validation.00000-of-00008.json.gz"),
    ],
)
def test_c4_requests_reference_shard(
    monkeypatch: pytest.MonkeyPatch, purpose: str, split: str, data_file: str
) -> None:
    fake = FakeHub({"text": ["doc a", "doc b"], "url": ["u", "v"]})
    monkeypatch.setattr(data, "load_dataset", fake)
    assert data.load_text("c4", purpose=purpose) == "doc a\n\ndoc b"  # type: ignore[arg-type]
    assert fake.calls == [
        {"path": "allenai/c4", "name": None, "split": split, "data_files": {split: data_file}}
    ]


def test_c4_keeps_a_fixed_row_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub({"text": [f"doc {i}" for i in range(600)]})
    monkeypatch.setattr(data, "load_dataset", fake)
    first = data.load_text("c4", purpose="evaluation").split("\n\n")
    assert len(first) == 500 and first == sorted(first, key=lambda s: int(s.split()[1]))
    assert data.load_text("c4", purpose="evaluation").split("\n\n") == first


def test_alpaca_row_split_is_deterministic_and_disjoint(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [f"row {i}" for i in range(100)]
    fake = FakeHub({"text": rows, "instruction": ["i"] * 100})
    monkeypatch.setattr(data, "load_dataset", fake)
    calib = data.load_text("alpaca", purpose="calibration").split("\n\n")
    held = data.load_text("alpaca", purpose="evaluation").split("\n\n")
    assert len(calib) == 90 and len(held) == 10
    assert sorted(calib + held, key=lambda s: int(s.split()[1])) == rows
    assert data.load_text("alpaca", purpose="evaluation").split("\n\n") == held
    assert held != rows[-10:]  # rows are drawn, not the tail
    assert all(c == {"path": "tatsu-lab/alpaca", "name": None, "split": "train"} for c in fake.calls)


def test_preset_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub({"body": ["one"]})
    monkeypatch.setattr(data, "load_dataset", fake)
    assert (
        data.load_text(
            "wikitext2", purpose="evaluation", split="validation", text_column="body", subset="cfg"
        )
        == "one"
    )
    assert fake.calls == [{"path": "wikitext", "name": "cfg", "split": "validation"}]


def test_generic_hub_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub({"content": ["a", "b"]}, splits=("train", "test"))
    monkeypatch.setattr(data, "load_dataset", fake)
    assert (
        data.load_text("org/corpus", purpose="calibration", text_column="content", subset="en")
        == "train:a\n\ntrain:b"
    )
    assert (
        data.load_text("org/corpus", purpose="evaluation", text_column="content", subset="en")
        == "test:a\n\ntest:b"
    )
    assert fake.calls[0] == {"path": "org/corpus", "name": "en"}
    assert (
        data.load_text("org/corpus", purpose="evaluation", text_column="content", split="train[:1]")
        == "a\n\nb"
    )
    assert fake.calls[-1] == {"path": "org/corpus", "name": None, "split": "train[:1]"}
    with pytest.raises(DataSourceError, match="available columns"):
        data.load_text("org/corpus", purpose="calibration")


def test_generic_hub_single_split_holds_out_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub({"text": _paragraphs(100)}, splits=("train",))
    monkeypatch.setattr(data, "load_dataset", fake)
    calib = data.load_text("org/one-split", purpose="calibration")
    held = data.load_text("org/one-split", purpose="evaluation")
    assert held and set(calib.split("\n\n")).isdisjoint(held.split("\n\n"))


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)"),
        OSError("offline\nsecond line"),
        datasets.exceptions.DatasetNotFoundError("Dataset 'org/x' doesn't exist on the Hub"),
    ],
)
@pytest.mark.parametrize("source", ["wikitext2", "org/x"])
def test_hub_failures_suggest_pydocs(monkeypatch: pytest.MonkeyPatch, error: Exception, source: str) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(data, "load_dataset", fail)
    with pytest.raises(DataSourceError, match="pydocs") as info:
        data.load_text(source, purpose="calibration")
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is error


def test_hub_value_error_becomes_data_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise ValueError("Unknown split \"tset\". Should be one of ['train', 'test'].")

    monkeypatch.setattr(data, "load_dataset", fail)
    with pytest.raises(DataSourceError, match="Unknown split"):
        data.load_text("org/x", purpose="evaluation", split="tset")


def test_mixed_calibration_draws_each_share_from_its_source(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    path = tmp_path / "other.txt"
    path.write_text("\n\n".join(_paragraphs(400)), encoding="utf-8")
    assert data.mix_counts(32, [(str(path), 0.125)]) == [28, 4]
    assert data.mix_counts(8, [("a", 0.01), ("b", 0.25)]) == [5, 1, 2]  # every mixed source gets a window
    rows = data.mixed_calibration_tokens(tokenizer, "pydocs", [(str(path), 0.25)], num_samples=8, seq_len=64)
    main = data.calibration_tokens(tokenizer, "pydocs", num_samples=6, seq_len=64)
    other = data.calibration_tokens(tokenizer, str(path), num_samples=2, seq_len=64)
    assert torch.equal(rows, torch.cat([main, other]))


@pytest.mark.parametrize(
    ("mix", "match"),
    [
        ([("x.txt", 0.0)], r"'x.txt' must be in \(0, 1\), got 0.0"),
        ([("x.txt", 1.5)], "got 1.5"),
        ([("x.txt", True)], "got True"),
        ([("a.txt", 0.5), ("b.txt", 0.5)], "sum must stay below 1"),
    ],
)
def test_mixed_calibration_refuses_bad_fractions(mix: list, match: str) -> None:
    with pytest.raises(DataSourceError, match=match):
        data.mix_counts(8, mix)


def test_a_broken_jsonl_file_is_refused_saying_where_it_breaks(tmp_path: Path) -> None:
    """datasets wraps the parse error in "An error occurred while generating the dataset": the cause is kept."""
    from hf_slicegpt.workflows.data import DataSourceError, load_text

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n{not json\n')
    with pytest.raises(DataSourceError, match=r"could not read .*JSON parse error.* in row 1.*valid jsonl"):
        load_text(str(bad), purpose="calibration")


def test_the_quiet_cli_reports_a_broken_jsonl_file_in_one_line(tmp_path: Path) -> None:
    from cli_helpers import run_cli, save_tiny_checkpoint

    dense = save_tiny_checkpoint(tmp_path / "dense")
    (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\n{not json\n')
    proc = run_cli("-q", "slice", dense, "--sparsity", "0.25", "--output", tmp_path / "out",
                   "--calibration", tmp_path / "bad.jsonl", "--num-samples", "4", "--seq-len", "32", tmp=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "JSON parse error" in proc.stderr and "bad.jsonl" in proc.stderr
