"""GGUF export of a global-rotation sliced model, read back by an independent reader: transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from cli_helpers import VOCAB, save_tiny_checkpoint, tiny_tokenizer, write_corpus
from tiny import calibration, make_tiny
from tiny_tokenizer import char_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import hf_slicegpt
from hf_slicegpt import cli
from hf_slicegpt.checkpoint.export import NativeExportError, native_round_to, save_native, to_native
from hf_slicegpt.checkpoint.gguf_export import GGUFExportError, export_gguf

INPUTS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sliced():
    dense = make_tiny("llama", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    return hf_slicegpt.slice_model(dense, ids, 0.25, rotation="global", show_progress=False)


@pytest.fixture(scope="module")
def native_dir(sliced, tokenizer, tmp_path_factory) -> Path:
    return save_native(sliced, tmp_path_factory.mktemp("gguf") / "native", tokenizer=tokenizer)


def _read_back(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-4), ("f16", 5e-3), ("q8_0", 2e-2)])
def test_transformers_reads_the_gguf_back_with_the_same_logits(native_dir, sliced, dtype, tolerance) -> None:
    path = export_gguf(native_dir, native_dir.parent / f"tiny-{dtype}.gguf", dtype=dtype)
    native = AutoModelForCausalLM.from_pretrained(native_dir, dtype=torch.float32)
    loaded = _read_back(path)
    assert loaded.config.hidden_size == sliced.config.embedding_dim == 24
    assert loaded.config.head_dim == 8 and not loaded.config.tie_word_embeddings
    expected = native(INPUTS).logits
    assert (loaded(INPUTS).logits - expected).abs().max().item() < tolerance
    assert (expected - sliced(INPUTS).logits).abs().max().item() < 1e-4

    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay F32 in every file
    wanted = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    # ffn_down's rows are the 64-wide MLP: whole Q8_0 blocks. ffn_up's are the sliced 24: F16 under q8_0.
    assert types["blk.0.ffn_down.weight"].name == wanted
    assert types["blk.0.ffn_up.weight"].name == ("F16" if dtype == "q8_0" else wanted)


def test_the_tokenizer_travels_in_the_gguf(native_dir, tokenizer) -> None:
    path = export_gguf(native_dir, native_dir.parent / "tok.gguf", dtype="f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "def slice(model):\n    return model  # 42 ok"
    assert read(text).input_ids == tokenizer(text).input_ids


def test_a_sliced_checkpoint_exports_through_the_cli(sliced, tokenizer, tmp_path, capsys) -> None:
    directory = tmp_path / "sliced"
    sliced.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    out = tmp_path / "model.gguf"
    assert cli.main(["export", str(directory), "--format", "gguf", "-o", str(out), "--dtype", "f32"]) == 0
    assert "model.gguf" in capsys.readouterr().out
    expected = to_native(sliced)(INPUTS).logits
    assert (_read_back(out)(INPUTS).logits - expected).abs().max().item() < 1e-4
    # an existing file is kept unless --overwrite
    assert cli.main(["export", str(directory), "-o", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    # --pre-tokenizer names llama.cpp's pre-tokenizer (SmolLM2's own digit splitting is "smollm")
    argv = ["export", str(directory), "-o", str(out), "--overwrite", "--pre-tokenizer", "smollm", "--quiet"]
    assert cli.main(argv) == 0
    from gguf import GGUFReader

    assert GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_what_cannot_be_written_is_refused(tmp_path, tokenizer) -> None:
    per_layer = hf_slicegpt.slice_model(
        make_tiny("llama", vocab_size=VOCAB), calibration(), 0.25, show_progress=False
    )
    with pytest.raises(NativeExportError, match="rotation='global'"):
        export_gguf(per_layer, tmp_path / "x.gguf", tokenizer=tokenizer)
    dense = make_tiny("llama")
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        export_gguf(dense, tmp_path / "x.gguf", tokenizer=char_tokenizer())
    with pytest.raises(GGUFExportError, match="needs the tokenizer"):
        export_gguf(dense, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="dtype must be one of"):
        export_gguf(dense, tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(GGUFExportError, match="model_type='mistral'"):
        export_gguf(make_tiny("mistral", vocab_size=VOCAB), tmp_path / "x.gguf", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_native_widths_are_multiples_of_the_heads_before_slicing() -> None:
    smollm2_like = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    assert native_round_to(smollm2_like, 0.25) == 72  # lcm(8, 9): 576 -> 432 = 6 x 72
    assert native_round_to(smollm2_like, 0.25, round_to=8) == 8  # 432 is a multiple of 9 already
    with pytest.raises(NativeExportError, match=r"to 400, .* use width 360 \(--round-to 72"):
        native_round_to(smollm2_like, 0.3, round_to=8)


def test_the_cli_refuses_a_native_width_before_slicing(tmp_path, capsys) -> None:
    dense = save_tiny_checkpoint(tmp_path / "dense", family="llama")  # hidden 32, 4 heads
    corpus = write_corpus(tmp_path / "corpus.txt", chars=5_000)
    out = tmp_path / "never"
    argv = ["slice", str(dense), "--sparsity", "0.25", "--calibration", str(corpus), "--num-samples", "2",
            "--seq-len", "32", "--rotation", "global", "--export", "native", "--round-to", "7", "-o", str(out)]  # fmt: skip
    assert cli.main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "slices the hidden size 32 to 21" in err and "use width 24 (--round-to 8" in err
    assert not out.exists()
