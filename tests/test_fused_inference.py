"""The fused inference path (readers + shortcut in one GEMM on the normed stream) changes nothing visible.

- on every tiny family, per-layer and global rotation, it gives the plain path's logits within 1e-5 relative,
  for a prefill and for a cached decode step, and it really runs (the blocks hold fused matrices);
- fusing is memory-neutral: the parameters become views of the (input-major) fused matrix, and ``state_dict``,
  ``save_pretrained`` (also with Trainer's explicit ``state_dict``) and ``from_pretrained`` see the unfused
  tensors under their usual names;
- in-place weight updates reach the fused matrix; ``.to(dtype)`` and reassigned weights are re-fused;
- gradients, or PEFT LoRA wrapping a reader or a shortcut, run the plain path and stay correct;
- ``"auto"`` (the default) fuses the weights but runs the plain path eagerly, the fused one when compiled.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny import FAMILIES, calibration, make_tiny
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.modeling.modeling_sliced import CACHE_NAME, SlicedReaderLinear

RTOL = 1e-5


def _sliced(family: str = "llama", rotation: str = "layer", sparsity: float = 0.25):
    return hf_slicegpt.slice_model(
        make_tiny(family), calibration(), sparsity, round_to=4, rotation=rotation, show_progress=False
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def _logits(model, ids: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits of ``ids[:, :-1]`` and the logits of one cached decode step on ``ids[:, -1:]``."""
    model.set_fused_inference(fused)
    out = model(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(out, CACHE_NAME)  # `past_key_values` before transformers 5.24, `cache` from it on
    step = model(input_ids=ids[:, -1:], **{CACHE_NAME: cache}, use_cache=True)
    return out.logits, step.logits


def _fused_groups(model) -> int:
    return sum(len(layer._fused) for layer in model.model.layers)


@pytest.mark.parametrize("rotation", ["layer", "global"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_equal_plain_on_every_family(family: str, rotation: str) -> None:
    model = _sliced(family, rotation)
    ids = calibration(3, 12, seed=7)
    plain = _logits(model, ids, fused=False)
    assert _fused_groups(model) == 0
    fused = _logits(model, ids, fused=True)
    layers = len(model.model.layers)
    assert _fused_groups(model) == (layers if model.config.topology == "parallel" else 2 * layers)
    for got, want in zip(fused, plain):
        assert _relative(got, want) < RTOL


def test_fusing_is_memory_neutral_and_invisible_to_the_checkpoint(tmp_path) -> None:
    model = _sliced()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse()
    layer = model.model.layers[0]
    entry = layer._fused["attn"]
    rows = sum(
        m.weight.shape[0] for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    )
    # Each weight is a view of the fused matrix: one copy in memory, in the order [W_q; W_k; W_v; S], stored
    # input-major (W^T contiguous), the layout in which one token's product streams the weights fastest on CPU.
    assert entry.weight_t.is_contiguous() and entry.weight_t.shape[0] == layer.self_attn.q_proj.in_features
    assert layer.self_attn.q_proj.weight.data_ptr() == entry.weight.data_ptr()
    assert (
        layer.attn_shortcut.weight.untyped_storage().data_ptr() == entry.weight.untyped_storage().data_ptr()
    )
    assert entry.weight.shape[0] == rows + layer.attn_shortcut.weight.shape[0]
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name

    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in before.items() if k != "lm_head.weight" or k in saved
    }
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _fused_groups(reloaded) == 2 * len(reloaded.model.layers)  # fused at load
    ids = calibration(2, 10, seed=3)
    with torch.no_grad():
        assert _relative(reloaded(ids).logits, model(ids).logits) < RTOL
    # Trainer saves with an explicit state_dict of the fused (interleaved) views: the same file comes out.
    reloaded.save_pretrained(tmp_path / "again", state_dict=reloaded.state_dict())
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_from_pretrained_fuses_from_the_file(tmp_path, shard: str | None) -> None:
    """The fused matrices are read from the safetensors file (one file or shards), not from its memory map."""
    model = _sliced("qwen2")  # reader biases too
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for layer, original in zip(reloaded.model.layers, model.model.layers):
        entry = layer._fused["attn"]
        attn = original.self_attn
        expected = torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, original.attn_shortcut.weight]
        )
        assert torch.equal(entry.weight, expected)
        assert torch.equal(entry.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        assert (
            layer.self_attn.v_proj.bias.untyped_storage().data_ptr()
            == entry.bias.untyped_storage().data_ptr()
        )
    ids = calibration(2, 10, seed=3)
    with torch.no_grad():
        assert _relative(reloaded(ids).logits, model(ids).logits) < RTOL


def test_in_place_updates_reach_the_fused_matrix_and_replaced_weights_refuse() -> None:
    model = _sliced()
    other = _sliced(sparsity=0.25)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = calibration(2, 10, seed=3)
    model.fuse()
    model.load_state_dict(other.state_dict())  # in place: the views, hence the fused matrix, change
    fused, plain = _logits(model, ids, True), _logits(model, ids, False)
    assert _relative(fused[0], plain[0]) < RTOL
    assert _relative(fused[0], _logits(other, ids, False)[0]) < RTOL

    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: the stale matrix must not be used
    model.set_fused_inference(True)
    assert _relative(_logits(model, ids, True)[0], _logits(model, ids, False)[0]) < RTOL

    model.set_fused_inference(True)
    model.to(torch.float64)  # fused again at once, in float64; no stale float32 copy is kept
    entries = [entry for layer in model.model.layers for entry in layer._fused.values()]
    assert len(entries) == 2 * len(model.model.layers)
    assert all(entry.weight_t.dtype == torch.float64 for entry in entries)
    layer = model.model.layers[0]  # the parameters are views of the new matrices
    attn = layer._fused["attn"].weight_t.untyped_storage().data_ptr()
    assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == attn
    fused64, plain64 = _logits(model, ids, True), _logits(model, ids, False)
    assert fused64[0].dtype == torch.float64
    assert _relative(fused64[0], plain64[0]) < RTOL  # the norm itself runs in float32 on both paths


def test_gradients_take_the_plain_path_and_train() -> None:
    model = _sliced()
    model.fuse()
    ids = calibration(2, 10, seed=3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.grad is not None and layer.attn_shortcut.weight.grad is not None
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("targets", [["q_proj", "gate_proj"], ["attn_shortcut", "mlp_shortcut"]])
def test_peft_lora_on_readers_or_shortcuts_uses_the_plain_path(targets: list[str]) -> None:
    model = _sliced()
    model.fuse()
    ids = calibration(2, 10, seed=3)
    with torch.no_grad():
        base = model(ids).logits
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits
        model.set_fused_inference(False)
        plain = peft_model(input_ids=ids).logits
    assert _relative(with_adapter, base) > 1e-3  # the adapter is applied, not bypassed by the fused GEMM
    assert _relative(with_adapter, plain) < RTOL
    # Merging writes the adapters into the (fused) weights; the fused path then includes them.
    merged = peft_model.merge_and_unload()
    merged.set_fused_inference(True)
    with torch.no_grad():
        assert _relative(merged(ids).logits, plain) < RTOL
    assert _fused_groups(merged) == 2 * len(merged.model.layers)


def test_slicer_modules_become_readers_only_when_fusing() -> None:
    model = _sliced()
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(calibration(1, 4))
    assert isinstance(q_proj, SlicedReaderLinear) and q_proj.precomputed is None


def _compiled_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits of ``torch.compile(model)`` (dynamo with the eager backend) and the linears its graphs call."""
    linears = []

    def backend(graph_module, example_inputs):
        nodes = graph_module.graph.nodes
        linears.append(sum(n.op == "call_function" and "linear" in str(n.target) for n in nodes))
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=backend)(ids).logits
    return logits, sum(linears)


@pytest.mark.parametrize("family", ["llama", "phi", "opt"])
def test_compile_traces_the_fused_path_of_a_fused_model(family: str) -> None:
    model = _sliced(family)
    ids = calibration(2, 10, seed=3)
    model.set_fused_inference(False)
    with torch.no_grad():
        plain = model(ids).logits
    _, plain_linears = _compiled_logits(model, ids)
    model.set_fused_inference(True)
    model.fuse()
    fused, fused_linears = _compiled_logits(model, ids)
    assert _relative(fused, plain) < RTOL
    # sequential: q, k, v, shortcut -> 1 and gate, up, shortcut -> 1 per block; parallel: all readers -> 1
    assert fused_linears < plain_linears - len(model.model.layers)


def test_compile_never_fuses_and_refuses_replaced_weights() -> None:
    model = _sliced()
    ids = calibration(2, 10, seed=3)
    with torch.no_grad():
        plain = model(ids).logits  # an eager forward fuses; drop that to trace an un-fused model
    for layer in model.model.layers:
        layer._fused.clear()
    _, unfused_linears = _compiled_logits(model, ids)
    assert _fused_groups(model) == 0  # a trace does not mutate the parameters into views
    model.fuse()
    fused, fused_linears = _compiled_logits(model, ids)
    assert fused_linears < unfused_linears and _relative(fused, plain) < RTOL
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(q_proj.weight.detach() * 2)  # the fused matrix is now stale
    model.set_fused_inference(False)
    with torch.no_grad():
        changed = model(ids).logits
    model.set_fused_inference(True)
    got, _ = _compiled_logits(model, ids)
    assert _relative(changed, plain) > 1e-3 and _relative(got, changed) < RTOL


def test_inductor_freezing_compiles_the_fused_model_to_its_eager_logits() -> None:
    """docs/performance.md's CPU decode recipe: freezing makes the fused matrices graph constants; same logits."""
    from torch._inductor import config as inductor

    model = _sliced().eval()
    ids = calibration(2, 10, seed=3)
    with torch.no_grad():
        eager = model(ids).logits
    torch._dynamo.reset()
    with inductor.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model, dynamic=False)(ids).logits
    torch._dynamo.reset()
    assert _fused_groups(model) > 0 and _relative(compiled, eager) < RTOL


def test_auto_fuses_but_runs_plain_eagerly_and_fused_when_compiled() -> None:
    model = _sliced()
    layer = model.model.layers[0]
    assert layer.fused_inference == "auto"
    ids = calibration(2, 10, seed=3)
    with torch.no_grad():
        eager = model(ids).logits
        assert layer._fused_group("attn") is None  # eager: the plain path...
        entry = layer._fused["attn"]  # ...on weights that are fused (views), for a later trace
        assert (
            layer.self_attn.q_proj.weight.untyped_storage().data_ptr()
            == entry.weight_t.untyped_storage().data_ptr()
        )
        model.set_fused_inference(True)
        assert layer._fused_group("attn") == (
            entry,
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
        )
    model.set_fused_inference("auto")
    compiled, fused_linears = _compiled_logits(model, ids)  # the trace takes the fused groups
    model.set_fused_inference(False)
    _, plain_linears = _compiled_logits(model, ids)
    assert fused_linears < plain_linears and _relative(compiled, eager) < RTOL
    with pytest.raises(ValueError, match="True, False or 'auto'.*'fast'"):
        model.set_fused_inference("fast")
