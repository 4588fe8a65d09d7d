"""``SlicingConfig``: validated once, round-trips through ``to_dict``/``from_dict`` and the checkpoint."""

from __future__ import annotations

import math

import pytest
from tiny import calibration, make_tiny

import hf_slicegpt
from hf_slicegpt import SliceGPTError, SlicingConfig, SlicingError


def test_round_trip_and_equality() -> None:
    config = SlicingConfig(sparsity=0.3, rotation="global", round_to=16, vocab_prior=0.5)
    assert SlicingConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["rotation"] == "global"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 25}, "looks like a percentage"),
        ({"sparsity": 0.25, "round_to": 0}, "round_to must be a positive integer"),
        ({"sparsity": 0.25, "rotation": "diagonal"}, "rotation must be one of 'layer', 'global'"),
        ({"sparsity": 0.25, "schedule": "cosine"}, "schedule must be one of"),
        ({"sparsity": 0.25, "vocab_prior": -1}, "vocab_prior must be a non-negative number"),
        ({"sparsity": 0.25, "rotation": "global", "schedule": "variance"}, "use schedule='const'"),
        ({"sparsity": 0.25, "rotation": "global", "slice_head": False}, "drop slice_head=False"),
        ({"sparsity": 0.25, "covariance_precision": "float16"}, "covariance_precision must be one of"),
        (
            {"sparsity": 0.25, "correction": "none", "correction_shortcuts": True},
            r"correction_shortcuts set with correction='none', which runs no correction; drop it, or use "
            r"correction='ridge'",
        ),
        (
            {"sparsity": 0.25, "correction": "none", "correction_fraction": 0.5, "correction_basis": "dense"},
            "correction_fraction, correction_basis set with correction='none'.*drop them",
        ),
    ],
)
def test_bad_values_name_the_field_and_the_fix(kwargs, match) -> None:
    with pytest.raises(SlicingError, match=match) as err:
        SlicingConfig(**kwargs)
    assert isinstance(err.value, SliceGPTError) and isinstance(err.value, ValueError)


def test_the_checkpoint_records_the_config_it_was_sliced_with(tmp_path) -> None:
    config = SlicingConfig(sparsity=0.25, round_to=4, mid_basis="own", vocab_prior=0.25)
    sliced = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), config, show_progress=False)
    sliced.save_pretrained(tmp_path)
    reloaded = hf_slicegpt.SlicedConfig.from_pretrained(tmp_path)
    assert SlicingConfig.from_dict(reloaded.slicing) == config


def test_keyword_options_override_a_config_and_unknown_ones_are_refused() -> None:
    base = SlicingConfig(sparsity=0.5)
    sliced = hf_slicegpt.slice_model(make_tiny("llama"), calibration(), base, round_to=4, show_progress=False)
    assert sliced.config.attn_input_dims == [16, 16] and sliced.config.slicing["round_to"] == 4
    with pytest.raises(SlicingError, match="rotaton.*fields of hf_slicegpt.SlicingConfig"):
        hf_slicegpt.slice_model(make_tiny("llama"), calibration(), 0.25, rotaton="global")
    with pytest.raises(SlicingError, match="rotaton"):
        hf_slicegpt.slice_model(make_tiny("llama"), calibration(), base, rotaton="global")
    with pytest.raises(SlicingError, match="needs a sparsity"):
        hf_slicegpt.slice_model(make_tiny("llama"), calibration())


def test_a_negative_zero_sparsity_is_recorded_as_zero() -> None:
    config = SlicingConfig(sparsity=-0.0)
    assert math.copysign(1.0, config.sparsity) == 1.0 and config.to_dict()["sparsity"] == 0.0
