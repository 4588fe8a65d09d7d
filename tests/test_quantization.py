"""A sliced checkpoint loads with a transformers quantization config (torchao int8 weight-only, on CPU).

torchao is not in the project venv (compiled parts; ``pip install "hf-slicegpt[quant]"``): skipped without it.
"""

from __future__ import annotations

import pytest
import torch
from tiny import calibration, make_tiny
from transformers import AutoModelForCausalLM, TorchAoConfig

import hf_slicegpt

torchao = pytest.importorskip(
    "torchao.quantization", reason="needs torchao: pip install 'hf-slicegpt[quant]'"
)
# Regexes on parameter names: a bare "attn_shortcut" matches nothing, and a given list replaces the default skips.
KEEP_SHORTCUTS = ["lm_head", r".*\.attn_shortcut", r".*\.mlp_shortcut"]


@pytest.mark.parametrize("skip", [None, KEEP_SHORTCUTS])
def test_sliced_checkpoint_loads_int8_with_or_without_its_shortcuts(tmp_path, skip) -> None:
    dense = make_tiny("llama", hidden_size=64, intermediate_size=128)
    sliced = hf_slicegpt.slice_model(dense, calibration(), 0.25, show_progress=False)
    sliced.save_pretrained(tmp_path)
    config = TorchAoConfig(torchao.Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    quantised = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight.data) is not torch.Tensor
    }
    shortcuts = {n for n, _ in model.named_modules() if n.endswith("_shortcut")}
    assert shortcuts and "model.layers.0.self_attn.q_proj" in quantised and "lm_head" not in quantised
    assert (shortcuts <= quantised) == (skip is None) and not (skip and shortcuts & quantised)
    inputs = calibration(2, 12, seed=7)
    assert (model(inputs).logits - sliced(inputs).logits).abs().max().item() < 0.1
