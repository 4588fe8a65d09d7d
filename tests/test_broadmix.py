"""The built-in broad calibration mix: offline, deterministic, and never the benchmarks' evaluation text."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import char_tokenizer

from hf_slicegpt.workflows.broadmix import (
    broad_texts,
    check_broad_mix,
    mix_broad,
    package_prose,
    structured_text,
    with_broad_mix,
)

_ROBUSTNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
_SPEC = importlib.util.spec_from_file_location("robustness", _ROBUSTNESS)
robustness = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(robustness)


def test_kinds_are_available_offline_deterministic_and_not_evaluation_text():
    texts = broad_texts()
    assert set(texts) == {"code", "structured", "prose"}
    assert len(texts["code"]) > 200_000 and "def " in texts["code"]
    assert structured_text() == structured_text()
    assert texts == broad_texts()
    # benchmarks/robustness.py evaluates on licences, git release notes and its own synthetic records
    assert "GNU GENERAL PUBLIC LICENSE" not in texts["code"]
    assert '"tags": [' not in texts["structured"]


def test_prose_is_the_installed_packages_readmes_and_licences_spread_over_many_packages():
    prose = broad_texts()["prose"]
    assert len(prose) > 100_000
    assert "pip install" in prose  # READMEs
    assert "WARRANTY" in prose.upper() and "Permission" in prose  # licences
    documents = list(package_prose())
    assert len(documents) == len(set(documents)) and max(map(len, documents)) <= 4_000
    # a prefix of the order is not one package's text: the shuffle spreads it
    assert len({document[:200] for document in documents[:20]}) == 20


def test_prose_leaves_out_this_projects_own_readme():
    """Editing hf-slicegpt's README must not change what a default slice calibrates on."""
    own = importlib.metadata.distribution("hf-slicegpt").metadata.get_payload().strip()
    assert len(own) >= 400  # our README would qualify as a document, so the test can fail
    assert all(document != own[:4_000] for document in package_prose())


def test_a_filter_leaves_documents_out_and_a_benchmark_can_leave_out_what_it_evaluates():
    licence = "Licensed under the Apache License, Version Two (the License); you may not use this file"
    overlaps = robustness.shares_text_with([f"Some header. {licence} except in compliance."])
    assert overlaps(f"intro {licence.upper()}!")  # case and punctuation aside
    words = licence.replace(",", " ").split()
    assert overlaps(" ".join(words[:13])) and not overlaps(" ".join(words[:12]))  # 13 words, not 12
    texts = broad_texts(keep=lambda kind, document: kind != "prose" or not overlaps(document))
    assert texts["code"] == broad_texts()["code"]
    assert not overlaps(texts["prose"]) and len(texts["prose"]) > 100_000


def test_mix_replaces_a_share_of_the_windows_and_zero_turns_it_off():
    tokenizer = char_tokenizer()
    calib = torch.randint(0, 50, (32, 16))
    mixed = with_broad_mix(tokenizer, calib, fraction=1 / 16)
    assert mixed.shape == calib.shape
    kept = sum(any(torch.equal(row, other) for other in calib) for row in mixed)
    assert kept == 26  # 2 windows of each of the 3 kinds
    assert torch.equal(with_broad_mix(tokenizer, calib, fraction=1 / 16), mixed)
    assert torch.equal(with_broad_mix(tokenizer, calib, fraction=0), calib)


def test_mix_takes_given_kinds_and_leaves_out_an_empty_one():
    tokenizer = char_tokenizer()
    calib = torch.randint(0, 50, (32, 16))
    mixed = with_broad_mix(tokenizer, calib, fraction=1 / 16, texts={"mine": "abcde " * 200, "none": ""})
    assert mix_broad(tokenizer, calib, fraction=1 / 16, texts={"mine": "abcde " * 200, "none": ""})[1] == [
        "mine"
    ]
    kept = sum(any(torch.equal(row, other) for other in calib) for row in mixed)
    assert mixed.shape == calib.shape and kept == 30
    assert set(tokenizer.decode(mixed[-1])) <= set("abcde ")


def test_too_few_windows_keep_the_users_text_and_bad_shares_are_named(caplog):
    tokenizer = char_tokenizer()
    calib = torch.randint(0, 50, (3, 16))  # one window per kind would leave 1 of 3 of the user's own
    with caplog.at_level("WARNING", logger="hf_slicegpt.workflows.broadmix"):
        mixed, kinds = mix_broad(tokenizer, calib)
    assert torch.equal(mixed, calib) and kinds == []  # nothing went in, and the caller is told so
    assert "Broad mix skipped: 3 calibration windows" in caplog.text
    for bad in (0.5, -0.1, True, "1/16"):
        with pytest.raises(ValueError, match="broad mix fraction must be in"):
            check_broad_mix(bad)
