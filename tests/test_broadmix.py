"""The built-in broad calibration mix: offline, deterministic, and never the benchmarks' evaluation text."""

from __future__ import annotations

import pytest
import torch
from tiny_tokenizer import char_tokenizer

from hf_slicegpt.workflows.broadmix import broad_texts, check_broad_mix, structured_text, with_broad_mix


def test_kinds_are_available_offline_deterministic_and_not_evaluation_text():
    texts = broad_texts()
    assert set(texts) == {"code", "structured"}
    assert len(texts["code"]) > 200_000 and "def " in texts["code"]
    assert structured_text() == structured_text()
    # benchmarks/robustness.py evaluates on licences, git release notes and its own synthetic records
    assert "GNU GENERAL PUBLIC LICENSE" not in texts["code"]
    assert '"tags": [' not in texts["structured"]


def test_mix_replaces_a_share_of_the_windows_and_zero_turns_it_off():
    tokenizer = char_tokenizer()
    calib = torch.randint(0, 50, (32, 16))
    mixed = with_broad_mix(tokenizer, calib, fraction=1 / 16)
    assert mixed.shape == calib.shape
    kept = sum(any(torch.equal(row, other) for other in calib) for row in mixed)
    assert kept == 28  # 2 windows of each of the 2 kinds
    assert torch.equal(with_broad_mix(tokenizer, calib, fraction=1 / 16), mixed)
    assert torch.equal(with_broad_mix(tokenizer, calib, fraction=0), calib)


def test_too_few_windows_keep_the_users_text_and_bad_shares_are_named(caplog):
    tokenizer = char_tokenizer()
    calib = torch.randint(0, 50, (3, 16))  # one window per kind would leave 1 of 3 of the user's own
    with caplog.at_level("WARNING", logger="hf_slicegpt.workflows.broadmix"):
        assert torch.equal(with_broad_mix(tokenizer, calib), calib)
    assert "Broad mix skipped: 3 calibration windows" in caplog.text
    for bad in (0.5, -0.1, True, "1/16"):
        with pytest.raises(ValueError, match="broad mix fraction must be in"):
            check_broad_mix(bad)
