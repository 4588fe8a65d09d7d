"""Property tests that get past validation: valid random tiny models of every family, sliced in every mode.

Hypothesis draws a family, a config (hidden size, layers, MLP width), a sparsity, a rounding and a valid
combination of rotation, schedule, mid basis, tied-embedding mode and ``slice_head``. Every draw must slice
(it is valid) and satisfy the invariants users rely on:

- a 0% slice in the same modes computes the dense model's logits;
- the logits are finite (no NaN/inf);
- the widths are the promised ones (const schedule) and the parameters stay within the budget: nothing but the
  shortcut matrices, the embedding projections and an untied head may add parameters, and the variance
  schedule spends no more than the const schedule;
- ``save_pretrained`` + ``from_pretrained`` gives identical logits with the plugin, and the same logits without
  it (``trust_remote_code=True`` in a fresh process that cannot import hf_slicegpt; one process for all draws).

Few examples (the profile in conftest.py) and no deadline: each draw slices a tiny model two or three times.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_families import _REMOTE_SCRIPT
from tiny import VOCAB, make_tiny
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.checkpoint.validation import validate_checkpoint

LAYER_NORM_FAMILIES = {"opt", "phi", "gpt_neox", "gpt_neox_sequential"}
FIXED_SHAPE = {"phi3"}  # its rope factors are sized for hidden 32 / 4 heads: only the depth varies
FAMILIES = sorted(
    ["llama", "llama_tied", "llama3", "mistral", "qwen2", "qwen3", "gemma", "phi3", *LAYER_NORM_FAMILIES]
)
PROBE = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(11))


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    family = draw(st.sampled_from(FAMILIES))
    overrides: dict[str, Any] = {"num_hidden_layers": draw(st.integers(1, 3))}
    if family not in FIXED_SHAPE:
        hidden = draw(st.sampled_from([32, 64]))  # 4 heads: head_dim 8 or 16 (partial rotary stays even)
        overrides["hidden_size"] = hidden
        key = "ffn_dim" if family == "opt" else "intermediate_size"
        overrides[key] = draw(st.sampled_from([16, 48, 96]))
        if family == "opt":
            overrides["word_embed_proj_dim"] = hidden
    rotation = draw(st.sampled_from(["layer", "global"]))
    tied_modes = ["auto", "project", "untie"] + ([] if family in LAYER_NORM_FAMILIES else ["slice"])
    modes = {
        "rotation": rotation,
        "schedule": "const" if rotation == "global" else draw(st.sampled_from(["const", "variance"])),
        "mid_basis": draw(st.sampled_from(["auto", "own", "shared"])),
        "tied_embeddings": draw(st.sampled_from(tied_modes)),
        "slice_head": True if rotation == "global" else draw(st.booleans()),
        "round_to": draw(st.sampled_from([1, 4, 8])),
    }
    sparsity = draw(st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5]), st.floats(0.0, 0.9)))
    return {"family": family, "overrides": overrides, "modes": modes, "sparsity": sparsity}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _allowed_extra(sliced: torch.nn.Module, dense: torch.nn.Module) -> int:
    """Parameters a slice may add: shortcut matrices, embedding projections, and a head untied from its table."""
    extra = sum(
        p.numel()
        for name, p in sliced.named_parameters()
        if "shortcut" in name or "embed_proj" in name or "head_proj" in name
    )
    dense_tied = dense.get_output_embeddings().weight is dense.get_input_embeddings().weight
    if dense_tied and sliced.lm_head.weight is not sliced.model.embed_tokens.weight:
        extra += sliced.lm_head.weight.numel()
    return extra


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_valid_random_models_slice_and_keep_every_invariant(tmp_path: Path) -> None:
    calibration = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(2))
    saved: dict[str, tuple[str, torch.Tensor]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    @settings(max_examples=8)
    @given(case=cases())
    def check(case: dict[str, Any]) -> None:
        note(f"case: {case}")
        dense = make_tiny(case["family"], seed=len(saved), **case["overrides"])
        modes, sparsity = case["modes"], case["sparsity"]
        dense_logits = _logits(dense)

        exact = hf_slicegpt.slice_model(copy.deepcopy(dense), calibration, 0.0, show_progress=False, **modes)
        scale = dense_logits.abs().max()
        assert (_logits(exact) - dense_logits).abs().max() <= 1e-4 * max(1.0, float(scale)), "0% is not exact"

        sliced = hf_slicegpt.slice_model(
            copy.deepcopy(dense), calibration, sparsity, show_progress=False, **modes
        )
        logits = _logits(sliced)
        assert torch.isfinite(logits).all()

        hidden = dense.config.hidden_size
        config = sliced.config
        if modes["schedule"] == "const":
            width = hf_slicegpt.sliced_width(hidden, sparsity, modes["round_to"])
            assert config.embedding_dim == width and config.attn_input_dims == [width] * len(
                config.attn_input_dims
            )
            assert config.head_input_dim == (width if modes["slice_head"] else hidden)
        assert _count(sliced) - _allowed_extra(sliced, dense) <= _count(dense)
        if modes["schedule"] == "variance":
            const = hf_slicegpt.slice_model(
                copy.deepcopy(dense),
                calibration,
                sparsity,
                show_progress=False,
                **{**modes, "schedule": "const"},
            )
            # the plan counts the width-dependent weights; biases of residual-width writers may differ a little
            slack = (2 * dense.config.num_hidden_layers + 2) * hidden
            assert _count(sliced) <= _count(const) + slack

        directory = tmp_path / f"case{len(saved)}"
        sliced.save_pretrained(directory)
        assert validate_checkpoint(directory).sliced
        reloaded = AutoModelForCausalLM.from_pretrained(directory)
        assert type(reloaded) is hf_slicegpt.SlicedModelForCausalLM
        assert torch.equal(_logits(reloaded), logits)
        saved[f"case{len(saved)}"] = (str(directory), logits)

    try:
        check()
    finally:
        torch.set_num_threads(threads)

    # Without the plugin: every saved draw loads with trust_remote_code in one fresh process.
    assert saved
    save_file({"input_ids": PROBE.contiguous()}, tmp_path / "probe.safetensors")
    out_file = tmp_path / "logits.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}  # fmt: skip
    jobs = {name: path for name, (path, _) in saved.items()}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _REMOTE_SCRIPT,
            json.dumps(jobs),
            str(tmp_path / "probe.safetensors"),
            str(out_file),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = load_file(out_file)
    for name, (_, logits) in saved.items():
        assert torch.allclose(remote[name], logits, atol=1e-5, rtol=0), name
