"""Every script in examples/ runs offline on a tiny checkpoint with small settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_helpers import REPO, cli_env, save_tiny_checkpoint

EXAMPLES = REPO / "examples"


def run_example(name: str, *args: object, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
        env=cli_env(tmp),
    )


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["generate.py", "slice_evaluate_save.py"]


def test_slice_evaluate_save_then_generate(tmp_path: Path) -> None:
    dense = save_tiny_checkpoint(tmp_path / "dense")
    out = tmp_path / "sliced"
    proc = run_example(
        "slice_evaluate_save.py", "--model", dense, "--num-samples", "8", "--seq-len", "32",
        "--eval-tokens", "512", "--output", out, tmp=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "perplexity on held-out pydocs" in proc.stdout
    assert "logits identical: True" in proc.stdout
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()

    proc = run_example("generate.py", out, "--prompt", "A list", "--max-new-tokens", "5", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "loaded SlicedModelForCausalLM (hf_slicegpt imported: True)" in proc.stdout
    assert "A list" in proc.stdout

    # Without the plugin: the checkpoint's own modeling code, through trust_remote_code.
    proc = run_example("generate.py", out, "--remote-code", "--max-new-tokens", "5", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "loaded SlicedModelForCausalLM (hf_slicegpt imported: False)" in proc.stdout
