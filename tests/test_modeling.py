"""The generic sliced architecture: save/load with and without the plugin, a complete config, generation from a
reloaded checkpoint, gradient checkpointing, device_map="auto", attention backends and dtypes.

Fresh processes get their inputs and return their logits as safetensors files (never pickles).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import VOCAB, calibration, make_tiny
from transformers import AutoConfig, AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt import SlicedConfig, SlicedModelForCausalLM, slice_model
from hf_slicegpt.modeling.configuration_sliced import FAMILY_FIELDS, ReadOnlyFieldError

CORE = ["llama", "llama_tied", "opt", "phi"]
PACKAGE_MODELING = Path(hf_slicegpt.__file__).parent / "modeling"

pytestmark = pytest.mark.xdist_group("modeling")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[mask == 0] = 1
    return ids, mask


PROBE_IDS, PROBE_MASK = _probe()
GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1)


@torch.no_grad()
@torch.no_grad()
def _logits(model, ids=PROBE_IDS, mask=PROBE_MASK) -> torch.Tensor:
    # Inference, as in the fresh processes below (the fused path).
    return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict]:
    """Each core family sliced at 25% and saved; with its logits and greedy tokens on PROBE."""
    root = tmp_path_factory.mktemp("sliced")
    out = {}
    for family in CORE:
        sliced = slice_model(make_tiny(family), calibration(), 0.25, show_progress=False)
        path = root / family
        sliced.save_pretrained(path)
        tokens = sliced.generate(input_ids=PROBE_IDS, attention_mask=PROBE_MASK, **GENERATE)
        out[family] = {"path": path, "model": sliced, "logits": _logits(sliced), "tokens": tokens}
    return out


# -- what is on disk ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CORE)
def test_checkpoint_files(family: str, saved) -> None:
    path = saved[family]["path"]
    files = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "slicegpt"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sliced.SlicedConfig",
        "AutoModelForCausalLM": "modeling_sliced.SlicedModelForCausalLM",
    }
    # The remote code is the package's own modeling code, byte for byte.
    for name in ("configuration_sliced.py", "modeling_sliced.py"):
        assert (path / name).read_bytes() == (PACKAGE_MODELING / name).read_bytes(), name


def test_remote_code_imports_only_torch_and_transformers() -> None:
    """The files shipped as remote code must run where only torch and transformers are installed."""
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    for name in ("configuration_sliced.py", "modeling_sliced.py"):
        tree = ast.parse((PACKAGE_MODELING / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only each other
                    assert node.module == "configuration_sliced", f"{name}: from .{node.module}"
                    continue
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in allowed, f"{name} imports {module}"


@pytest.mark.parametrize("family", CORE)
def test_config_alone_builds_the_model(family: str, saved) -> None:
    """config.json holds every width: a model built from it on the meta device has the saved tensors' shapes."""
    path = saved[family]["path"]
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, SlicedConfig)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    state = skeleton.state_dict()
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    missing = set(state) - set(shapes)
    if family in ("llama_tied", "opt"):
        assert missing <= {"lm_head.weight"}  # tied: stored once
    else:
        assert not missing


@pytest.mark.parametrize("family", CORE)
def test_standard_fields_are_exposed_read_only_and_agree_with_the_family(
    family: str, saved, tmp_path
) -> None:
    """lm-eval, vLLM and memory estimators read intermediate_size, rms_norm_eps, rope_parameters... at the top."""
    path = saved[family]["path"]
    raw = json.loads((path / "config.json").read_text())
    config = AutoConfig.from_pretrained(path)
    dense = make_tiny(family).config
    exposed = [name for name in FAMILY_FIELDS if hasattr(dense, name)]
    assert {"num_attention_heads", "max_position_embeddings"} <= set(exposed)
    for name in FAMILY_FIELDS:
        if name in exposed:
            assert getattr(config, name) == getattr(dense, name), name
            assert raw[name] == json.loads(json.dumps(getattr(dense, name))), name  # in config.json too
        else:  # absent where the family has no such field, as on the dense config
            assert not hasattr(config, name) and name not in raw, name
    if family.startswith("llama"):
        assert (config.intermediate_size, config.rms_norm_eps) == (64, dense.rms_norm_eps)
        assert config.rope_parameters["rope_theta"] == dense.rope_parameters["rope_theta"]

    with pytest.raises(ReadOnlyFieldError, match="family_config.max_position_embeddings"):
        config.max_position_embeddings = 7
    config.family_config.max_position_embeddings = 4096  # one source of truth: the top level follows
    assert config.max_position_embeddings == 4096

    raw["max_position_embeddings"] = 7  # a hand-edited config.json that contradicts its family config
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ReadOnlyFieldError, match="max_position_embeddings"):
        AutoConfig.from_pretrained(tmp_path)
    layers = raw["family_config"]["num_hidden_layers"]
    raw["max_position_embeddings"] = dense.max_position_embeddings
    raw["num_hidden_layers"] = layers - 1  # the KV cache would be one layer short (an IndexError in generate)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=f"num_hidden_layers is {layers - 1} but family_config.num_hidden_layers"
    ):
        AutoConfig.from_pretrained(tmp_path)


# -- reloading ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CORE)
def test_reload_in_process(family: str, saved) -> None:
    entry = saved[family]
    loaded = AutoModelForCausalLM.from_pretrained(entry["path"])
    assert isinstance(loaded, SlicedModelForCausalLM)
    assert torch.equal(_logits(loaded), entry["logits"])
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert tied == (family in ("llama_tied", "opt"))
    assert loaded.config.slicing["sparsity"] == 0.25


_CHILD = textwrap.dedent(
    """
    import json, sys
    if sys.argv[1] == "no-plugin":
        sys.modules["hf_slicegpt"] = None  # `import hf_slicegpt` now raises ImportError
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    if sys.argv[1] == "plugin":
        import hf_slicegpt  # noqa: F401  (registers the sliced classes)

    jobs, inputs, out = json.loads(sys.argv[2]), load_file(sys.argv[3]), sys.argv[4]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tensors, meta = {}, {}
    for family, path in jobs.items():
        kwargs = {"trust_remote_code": True} if sys.argv[1] == "no-plugin" else {}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        with torch.no_grad():
            tensors[family + ".logits"] = model(input_ids=ids, attention_mask=mask).logits.contiguous()
        tensors[family + ".tokens"] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1
        ).contiguous()
        meta[family] = {
            "module": type(model).__module__,
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        }
    try:
        import hf_slicegpt  # noqa: F401,F811
        meta["importable"] = True
    except ImportError:
        meta["importable"] = False
    meta["loaded"] = sorted(name for name in sys.modules if name.startswith("hf_slicegpt") and sys.modules[name])
    save_file(tensors, out, metadata={"meta": json.dumps(meta)})
    """
)


def _run_child(mode: str, saved: dict, workdir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """One fresh interpreter per mode loads every family's checkpoint."""
    inputs = workdir / "inputs.safetensors"
    save_file({"input_ids": PROBE_IDS.contiguous(), "attention_mask": PROBE_MASK.contiguous()}, inputs)
    out = workdir / f"{mode}.safetensors"
    jobs = {family: str(entry["path"]) for family, entry in saved.items()}
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(workdir / "modules"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONPATH", None)
    # -I: no user site, no PYTHON* variables, no script directory on sys.path; cwd is outside the repository.
    command = [sys.executable, "-I", "-c", _CHILD, mode, json.dumps(jobs), str(inputs), str(out)]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with safe_open(str(out), "pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
    return load_file(out), meta


@pytest.fixture(scope="module")
def plugin_child(saved, tmp_path_factory):
    return _run_child("plugin", saved, tmp_path_factory.mktemp("plugin"))


@pytest.fixture(scope="module")
def remote_child(saved, tmp_path_factory):
    return _run_child("no-plugin", saved, tmp_path_factory.mktemp("remote"))


@pytest.mark.parametrize("family", CORE)
def test_fresh_process_with_plugin(family: str, saved, plugin_child) -> None:
    tensors, meta = plugin_child
    assert meta[family]["module"] == "hf_slicegpt.modeling.modeling_sliced"
    # Not bitwise: the child runs one thread, and the fused GEMM's blocking may differ with the thread count.
    logits, want = tensors[f"{family}.logits"], saved[family]["logits"]
    assert ((logits - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.equal(tensors[f"{family}.tokens"], saved[family]["tokens"])
    assert meta[family]["tied"] == (family in ("llama_tied", "opt"))


def test_fresh_process_without_plugin_cannot_import_it(remote_child) -> None:
    _, meta = remote_child
    assert meta["importable"] is False
    assert meta["loaded"] == []


@pytest.mark.parametrize("family", CORE)
def test_fresh_process_without_plugin_trust_remote_code(family: str, saved, remote_child) -> None:
    tensors, meta = remote_child
    assert meta[family]["module"].startswith("transformers_modules."), meta[family]["module"]
    logits, want = tensors[f"{family}.logits"], saved[family]["logits"]
    assert ((logits - want).abs().max() / want.abs().max()).item() < 1e-5  # see the plugin test
    assert torch.equal(tensors[f"{family}.tokens"], saved[family]["tokens"])
    assert meta[family]["tied"] == (family in ("llama_tied", "opt"))


# -- training and placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CORE)
def test_gradient_checkpointing_matches_plain_backward(family: str, saved) -> None:
    path = saved[family]["path"]
    ids = calibration(2, 10, seed=3)
    grads, recomputed = [], []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(path)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        calls: list[int] = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *_, sink=calls: sink.append(1))
        loss = model(input_ids=ids, labels=ids).loss
        forward_calls = len(calls)
        loss.backward()
        recomputed.append(len(calls) > forward_calls)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-1].values())
    # Checkpointing really recomputed the block in backward, and gave the same gradients.
    assert recomputed == [False, True]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("family", CORE)
def test_loss_is_the_shifted_cross_entropy(family: str, saved) -> None:
    model = saved[family]["model"]
    ids = calibration(2, 10, seed=8)
    with torch.no_grad():
        output = model(input_ids=ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(
        output.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
    )
    assert torch.allclose(output.loss, expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt", "phi"])
def test_device_map_auto(family: str, saved) -> None:
    entry = saved[family]
    loaded = AutoModelForCausalLM.from_pretrained(entry["path"], device_map="auto")
    assert torch.equal(_logits(loaded), entry["logits"])
    assert "SlicedDecoderLayer" in loaded._no_split_modules


def test_auto_device_map_never_splits_a_block(saved, tmp_path) -> None:
    """With memory for one and a bit blocks, accelerate places whole sliced blocks (and the model still runs
    with the second block offloaded); without ``_no_split_modules`` the same budget would cut a block in two."""
    from accelerate import infer_auto_device_map

    entry = saved["llama"]
    model = entry["model"]
    embed_bytes = sum(p.numel() * p.element_size() for p in model.model.embed_tokens.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    budget = {"cpu": int(embed_bytes + 2.2 * layer_bytes), "disk": 10**9}
    device_map = infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=model._no_split_modules
    )
    assert device_map.get("model.layers.0") == "cpu" and device_map.get("model.layers.1") == "disk"
    assert not [key for key in device_map if key.startswith("model.layers.") and key.count(".") > 2]
    unconstrained = infer_auto_device_map(model, max_memory=budget)
    assert [key for key in unconstrained if key.startswith("model.layers.1.")]  # the budget really is tight

    offloaded = AutoModelForCausalLM.from_pretrained(
        entry["path"], device_map=dict(device_map), offload_folder=str(tmp_path)
    )
    assert torch.allclose(_logits(offloaded), entry["logits"], atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt", "phi"])
def test_eager_attention_matches_sdpa(family: str, saved) -> None:
    entry = saved[family]
    eager = AutoModelForCausalLM.from_pretrained(entry["path"], attn_implementation="eager")
    assert eager.config.family_config._attn_implementation == "eager"
    real = PROBE_MASK.bool()  # fully masked (padding) query rows are backend-defined
    assert torch.allclose(_logits(eager)[real], entry["logits"][real], atol=1e-5)


def test_reload_in_bfloat16(saved) -> None:
    entry = saved["llama"]
    loaded = AutoModelForCausalLM.from_pretrained(entry["path"], dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    got = _logits(loaded).float()
    assert (got - entry["logits"]).abs().max() < 0.05 * entry["logits"].abs().max()


def test_save_pretrained_of_a_reloaded_model_is_stable(saved, tmp_path) -> None:
    """Save -> load -> save gives the same tensors (nothing is re-folded or re-rotated on load)."""
    entry = saved["llama_tied"]
    loaded = AutoModelForCausalLM.from_pretrained(entry["path"])
    loaded.save_pretrained(tmp_path)
    first = load_file(entry["path"] / "model.safetensors")
    second = load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_deepcopy_and_state_dict_round_trip(saved) -> None:
    model = saved["opt"]["model"]
    clone = copy.deepcopy(model)
    assert clone.lm_head.weight is clone.model.embed_tokens.weight
    assert torch.equal(_logits(clone), saved["opt"]["logits"])
