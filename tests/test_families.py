"""One suite over every supported family (tiny random models, built in-process).

For each family: 0% slicing reproduces the dense logits; a 25% slice round-trips through save_pretrained /
from_pretrained both with the plugin and with ``trust_remote_code`` in a process that cannot import hf_slicegpt;
greedy generation is the same with and without the KV cache; the parameter count drops. Every configuration an
adapter refuses has a test for its error.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, calibration, make_tiny
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3TextConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

import hf_slicegpt
from hf_slicegpt import SlicedModelForCausalLM, UnsupportedModelError, get_adapter, slice_model
from hf_slicegpt.adapters import registered_adapters
from hf_slicegpt.modeling.modeling_sliced import CACHE_NAME

# All families in one xdist worker: the 25% slices and the remote-code subprocess are shared across tests.
pytestmark = pytest.mark.xdist_group("families")

# Longer than the sliding windows (4) of the tiny Mistral and Qwen2, so the windows really mask.
PROBE = calibration(2, 20, seed=5)
# Row 1 left-padded by 5 tokens.
PROBE_MASK = torch.ones_like(PROBE)
PROBE_MASK[1, :5] = 0
SPARSITY = 0.25


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only cost CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


@torch.no_grad()
def _logits(
    model: torch.nn.Module, ids: torch.Tensor = PROBE, mask: torch.Tensor | None = None
) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


@functools.cache
def _sliced(family: str) -> tuple[int, SlicedModelForCausalLM, torch.Tensor]:
    """(dense parameter count, 25% slice, its logits on PROBE), computed once per family."""
    dense = make_tiny(family)
    count = _num_params(dense)
    sliced = slice_model(dense, calibration(), SPARSITY, show_progress=False)
    return count, sliced, _logits(sliced)


# -- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_reproduces_dense_logits(family):
    dense = make_tiny(family)
    expected, expected_padded = _logits(dense), _logits(dense, mask=PROBE_MASK)
    sliced = slice_model(dense, calibration(), 0.0, show_progress=False)
    assert sliced.config.slicing["family"] == get_adapter(sliced.config.family_config).name
    assert (_logits(sliced) - expected).abs().max() < 1e-4
    real = PROBE_MASK.bool()
    assert (_logits(sliced, mask=PROBE_MASK)[real] - expected_padded[real]).abs().max() < 1e-4


@pytest.mark.parametrize("tied_embeddings", ["project", "slice", "untie"])
def test_gemma_embedding_scale_and_norm_offset_fold_exactly_in_every_tied_mode(tied_embeddings):
    dense = make_tiny("gemma")
    expected = _logits(dense)
    sliced = slice_model(dense, calibration(), 0.0, tied_embeddings=tied_embeddings, show_progress=False)
    assert sliced.config.tie_word_embeddings == (tied_embeddings != "untie")
    assert (_logits(sliced) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_is_read_from_the_config_and_really_masks(family):
    dense = make_tiny(family)
    windowless = make_tiny(family, sliding_window=None, use_sliding_window=False)
    # Same weights, no window: the logits differ, so the 0% test above would catch a model ignoring the window.
    assert (_logits(dense) - _logits(windowless)).abs().max() > 1e-3
    sliced = slice_model(dense, calibration(), 0.0, show_progress=False)
    expected = ["sliding_attention"] * 2 if family == "mistral" else ["full_attention", "sliding_attention"]
    assert sliced.model.layer_kinds == expected
    assert sliced.config.sliding_window == 4


def test_gpt_neox_residual_layout_follows_use_parallel_residual():
    parallel = slice_model(make_tiny("gpt_neox"), calibration(), SPARSITY, show_progress=False)
    sequential = slice_model(make_tiny("gpt_neox_sequential"), calibration(), SPARSITY, show_progress=False)
    assert parallel.config.topology == "parallel"
    assert sequential.config.topology == "sequential"
    assert sequential.config.attention_cache_kwarg == "layer_past"


def test_qwen3_head_norms_and_phi3_fused_outputs_are_untouched():
    dense = make_tiny("qwen3")
    q_norm = dense.model.layers[0].self_attn.q_norm.weight.clone()
    sliced = slice_model(dense, calibration(), SPARSITY, show_progress=False)
    assert torch.equal(sliced.model.layers[0].self_attn.q_norm.weight, q_norm)

    dense = make_tiny("phi3")
    qkv_out = dense.model.layers[0].self_attn.qkv_proj.out_features
    gate_up_out = dense.model.layers[0].mlp.gate_up_proj.out_features
    sliced = slice_model(dense, calibration(), SPARSITY, show_progress=False)
    width = sliced.config.attn_input_dims[0]
    assert width < dense.config.hidden_size
    assert sliced.model.layers[0].self_attn.qkv_proj.weight.shape == (qkv_out, width)
    assert sliced.model.layers[0].mlp.gate_up_proj.out_features == gate_up_out


# -- 25%: size, round trips, generation ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_drops(family):
    dense_count, sliced, _ = _sliced(family)
    assert _num_params(sliced) < dense_count


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_with_plugin(family, tmp_path):
    _, sliced, expected = _sliced(family)
    sliced.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SlicedModelForCausalLM)
    assert torch.allclose(_logits(loaded), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_same_with_and_without_cache(family):
    _, sliced, _ = _sliced(family)
    prompt = PROBE[:, :3]  # 3 + 6 tokens: past the sliding windows (4)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    # The cache must really be filled, or "with cache" would silently recompute everything (GPT-NeoX's attention
    # takes it as ``layer_past``).
    with torch.no_grad():
        output = sliced(input_ids=prompt, use_cache=True)
        assert (
            getattr(output, CACHE_NAME).get_seq_length() == prompt.shape[1]
        )  # `cache` from transformers 5.24
    with_cache = sliced.generate(prompt, use_cache=True, **kwargs)
    without_cache = sliced.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 9)
    assert torch.equal(with_cache, without_cache)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_slicegpt" or name.startswith("hf_slicegpt."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
            return None

    sys.meta_path.insert(0, _Blocked())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    jobs, probe_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    probe = load_file(probe_file)["input_ids"]
    logits, modules = {}, {}
    for family, path in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            logits[family] = model(input_ids=probe).logits.contiguous()
        modules[family] = type(model).__module__
    try:
        import hf_slicegpt  # noqa: F401
        modules["importable"] = True
    except ImportError:
        modules["importable"] = False
    save_file(logits, out_file, metadata={"modules": json.dumps(modules)})
    """
)


@pytest.fixture(scope="module")
def remote_code_results(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Every family's 25% slice, loaded with trust_remote_code in one subprocess without hf_slicegpt."""
    root = tmp_path_factory.mktemp("remote")
    jobs = {}
    for family in FAMILIES:
        jobs[family] = str(root / family)
        _sliced(family)[1].save_pretrained(jobs[family])
    save_file({"input_ids": PROBE.contiguous()}, root / "probe.safetensors")
    out_file = root / "logits.safetensors"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(root / "modules"),
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _REMOTE_SCRIPT,
            json.dumps(jobs),
            str(root / "probe.safetensors"),
            str(out_file),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with safe_open(str(out_file), "pt") as handle:
        modules = json.loads(handle.metadata()["modules"])
    return load_file(out_file), modules


def test_remote_code_process_cannot_import_hf_slicegpt(remote_code_results):
    _, modules = remote_code_results
    assert modules["importable"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_with_trust_remote_code(family, remote_code_results):
    logits, modules = remote_code_results
    assert modules[family].startswith("transformers_modules."), modules[family]
    assert torch.allclose(logits[family], _sliced(family)[2], atol=1e-5, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------------


def _opt(**overrides) -> OPTConfig:
    base = dict(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    )
    return OPTConfig(**{**base, **overrides})


def _with_layer_types(config_cls, *layer_types):
    config = config_cls(num_hidden_layers=len(layer_types))
    config.layer_types = list(layer_types)
    return config


# (refused config, the check that refuses it or None for a refused model_type, what the message must say)
REFUSALS = {
    "gemma2": (Gemma2Config(), None, "post_attention_layernorm"),
    "gemma3_text": (Gemma3TextConfig(), None, "post_feedforward_layernorm"),
    "gemma3": (Gemma3Config(), None, "computational invariance does not hold"),
    "opt_post_layer_norm": (
        _opt(do_layer_norm_before=False),
        "_pre_layer_norm",
        "do_layer_norm_before=False",
    ),
    "opt_embed_projection": (_opt(word_embed_proj_dim=16), "_no_projection", "word_embed_proj_dim=16"),
    "opt_no_final_norm": (_opt(_remove_final_layer_norm=True), "_final_norm", "_remove_final_layer_norm"),
    "opt_no_affine": (_opt(layer_norm_elementwise_affine=False), "_final_norm", "elementwise_affine=False"),
    "mistral_chunked": (
        _with_layer_types(MistralConfig, "full_attention", "chunked_attention"),
        "check_layer_types",
        "chunked_attention",
    ),
    "qwen2_chunked": (
        _with_layer_types(Qwen2Config, "chunked_attention", "full_attention"),
        "check_layer_types",
        "chunked_attention",
    ),
    "qwen3_linear": (
        _with_layer_types(Qwen3Config, "linear_attention", "full_attention"),
        "check_layer_types",
        "linear_attention",
    ),
    "phi3_chunked": (
        _with_layer_types(Phi3Config, "full_attention", "chunked_attention"),
        "check_layer_types",
        "chunked_attention",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_configuration_names_the_reason(case):
    config, _, message = REFUSALS[case]
    with pytest.raises(UnsupportedModelError, match="Cannot slice") as excinfo:
        get_adapter(config)
    assert message in str(excinfo.value)
    assert repr(config.model_type) in str(excinfo.value)


def test_every_adapter_check_has_a_refusal_test():
    checks = {check.__name__ for adapter in registered_adapters() for check in adapter.checks}
    tested = {check for _, check, _ in REFUSALS.values() if check is not None}
    assert checks <= tested, f"adapter checks without a refusal test: {sorted(checks - tested)}"
    refused = set(hf_slicegpt.adapters.refused_model_types())
    assert refused <= {config.model_type for config, check, _ in REFUSALS.values() if check is None}


def test_slice_model_refuses_gemma2_before_touching_the_model():
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    )
    model = Gemma2ForCausalLM(config)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="gemma2.*post_attention_layernorm"):
        slice_model(model, calibration(), SPARSITY, show_progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_unknown_model_type_lists_supported_ones_and_architectures_match_exactly():
    moe = Qwen2MoeConfig(num_hidden_layers=2)
    with pytest.raises(UnsupportedModelError, match="Unsupported model_type 'qwen2_moe'.*qwen2, qwen3"):
        get_adapter(moe)
    # A derivative under its own model_type: its architecture class selects the family, but only exactly.
    derivative = MistralConfig(num_hidden_layers=2)
    derivative.model_type = "my_mistral"
    derivative.architectures = ["MistralForCausalLM"]
    assert get_adapter(derivative).name == "mistral"
    derivative.architectures = ["Qwen2MoeForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="my_mistral"):
        get_adapter(derivative)
