"""The performance and scale paths give the same sliced model as the plain one.

- activations offloaded to host RAM or a memory-mapped file: identical weights;
- the low-memory path (blocks streamed from safetensors, written shard by shard): the same tensors and config
  as ``slice_model`` + ``save_pretrained``, loadable with ``from_pretrained``;
- resumable slicing: an interrupted run (an exception, or SIGKILL of a subprocess) resumed from its partial
  state writes a checkpoint bit-identical to an uninterrupted run's; a state from other settings is refused;
- data-parallel calibration: 2 processes (torchrun, gloo) give the same weights as 1 (relative diff < 1e-6);
- mixed-precision covariance sums agree with float64 ones;
- a plain update computed in the frame of its input basis (no expansion to full width) gives the model of the
  expanded stream.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import FAMILIES, calibration, make_tiny
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt import slicing
from hf_slicegpt.runtime.offload import OffloadError
from hf_slicegpt.runtime.resume import ResumeError
from hf_slicegpt.runtime.streaming import slice_checkpoint, staging_dir
from hf_slicegpt.slicing import InMemoryLayers, SlicingHooks, refit
from hf_slicegpt.slicing.pca import Covariance, NonFiniteSignalError

REPO = Path(__file__).resolve().parents[1]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def _stats(model) -> list[tuple[str, list[float]]]:
    return [(s.name, s.eigenvalues) for s in model.slicing_stats]


def _dir_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def reference():
    """A 4-layer tiny LLaMA with tied embeddings, its calibration, and its plain sliced state."""
    dense = make_tiny("llama_tied", seed=0, num_hidden_layers=4)
    ids = calibration(16, 16, seed=1)
    sliced = hf_slicegpt.slice_model(copy.deepcopy(dense), ids, 0.25, batch_size=4, show_progress=False)
    return dense, ids, _state(sliced), _stats(sliced)


# -- offloaded activations --------------------------------------------------------------------------------------
@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_activations_give_identical_weights(reference, offload):
    dense, ids, expected, stats = reference
    sliced = hf_slicegpt.slice_model(
        copy.deepcopy(dense), ids, 0.25, batch_size=4, offload=offload, show_progress=False
    )
    _assert_same(_state(sliced), expected)


def test_bad_offload_names_the_choices():
    with pytest.raises(OffloadError, match="'cpu', 'disk'"):
        hf_slicegpt.slice_model(
            make_tiny("llama"), calibration(4, 8), 0.25, offload="gpu", show_progress=False
        )


# -- plain updates in the frame of their input basis ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_updates_in_the_input_frame_give_the_model_of_the_expanded_stream(family, monkeypatch):
    """The frame path changes rounding only: the same logits as expanding each sliced input to full width.

    A ``covariance`` hook (here the identity) makes the loop sum in the stream's own coordinates, as hooks see
    them; so one run expands and the other does not, which the spy on ``expand`` confirms.
    """
    dense = make_tiny(family, seed=0)
    ids, probe = calibration(16, 16, seed=1), calibration(2, 16, seed=7)
    expanded: list[int] = []
    real_expand = refit.expand
    monkeypatch.setattr(refit, "expand", lambda *a: expanded.append(1) or real_expand(*a))
    config = slicing.SlicingConfig(sparsity=0.25, correction="none")

    def sliced(hooks=None) -> torch.Tensor:
        model = hf_slicegpt.slice_model(
            copy.deepcopy(dense), ids, config, batch_size=4, show_progress=False, hooks=hooks
        )
        with torch.no_grad():
            return model(probe).logits.double()

    framed = sliced()
    assert not expanded
    plain = sliced(SlicingHooks(covariance=lambda name, cov, signals, masks: cov))
    assert expanded
    rel = float((framed - plain).norm() / plain.norm())
    # rounding only: up to 1.5e-5 was seen (gpt_neox_sequential with mid_basis="shared")
    assert rel < 5e-5, f"{family}: the framed run's logits differ by {rel:.1e}"


def test_a_float64_run_keeps_float64_statistics_in_the_frame(monkeypatch):
    """``x q^T + branch(x)`` promotes to float64 in a float64 run, and so must ``[x, 0] + branch(x) F``: the
    covariances then sum float64 signals (float32 ones cost a float64 model 20x its rounding error)."""
    dtypes: set[torch.dtype] = set()
    real_add = Covariance.add
    monkeypatch.setattr(
        Covariance,
        "add",
        lambda cov, signal, mask=None: dtypes.add(signal.dtype) or real_add(cov, signal, mask),
    )
    dense = make_tiny("opt", seed=0).double()
    config = slicing.SlicingConfig(sparsity=0.25, correction="none")
    hf_slicegpt.slice_model(dense, calibration(16, 16, seed=1), config, batch_size=4, show_progress=False)
    assert dtypes == {torch.float64}


def test_a_basis_hook_without_orthonormal_columns_is_expanded_not_framed():
    """A frame must start with orthonormal columns; a ``basis`` hook may return others, and then the update
    expands, giving the model of the expanded stream."""
    dense = make_tiny("llama", seed=0)
    ids, probe = calibration(16, 16, seed=1), calibration(2, 16, seed=7)
    config = slicing.SlicingConfig(sparsity=0.25, correction="none")

    def scaled(name, values, vectors, width):
        return vectors[:, :width] * 1.1

    def logits(covariance=None) -> torch.Tensor:
        hooks = SlicingHooks(basis=scaled, covariance=covariance)
        model = hf_slicegpt.slice_model(
            copy.deepcopy(dense), ids, config, batch_size=4, show_progress=False, hooks=hooks
        )
        with torch.no_grad():
            return model(probe).logits

    torch.testing.assert_close(logits(), logits(lambda name, cov, signals, masks: cov), rtol=1e-5, atol=1e-5)


# -- mixed-precision covariance -------------------------------------------------------------------------------
def test_mixed_covariance_matches_float64():
    torch.manual_seed(0)
    x = torch.randn(3000, 48) * torch.linspace(0.01, 10, 48)
    mixed, exact = Covariance(48, precision="mixed"), Covariance(48, precision="float64")
    mixed.add(x)
    exact.add(x)
    assert mixed.tokens == exact.tokens == 3000
    rel = (mixed.sum - exact.sum).abs().max() / exact.sum.abs().max()
    assert rel < 1e-6


def test_mixed_covariance_redoes_float32_overflow_in_float64():
    x = torch.full((4, 3), 1e20)  # x^2 overflows float32, not float64
    cov = Covariance(3, precision="mixed")
    cov.add(x)
    assert torch.isfinite(cov.sum).all() and cov.sum[0, 0] == pytest.approx(4e40, rel=1e-6)
    with pytest.raises(NonFiniteSignalError, match="NaN or Inf"):
        cov.add(torch.tensor([[float("nan"), 1.0, 2.0]]))


# -- low-memory path --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,offload", [("llama_tied", "disk"), ("opt", "cpu")])
def test_streaming_checkpoint_equals_slice_model_and_save_pretrained(tmp_path, family, offload):
    dense = make_tiny(family, seed=0, num_hidden_layers=3)
    ids = calibration(8, 16, seed=2)
    dense.save_pretrained(tmp_path / "dense")
    plain = hf_slicegpt.slice_model(copy.deepcopy(dense), ids, 0.25, batch_size=4, show_progress=False)
    plain.save_pretrained(tmp_path / "plain")

    handle = slice_checkpoint(
        tmp_path / "dense",
        ids,
        0.25,
        tmp_path / "streamed",
        batch_size=4,
        offload=offload,
        show_progress=False,
    )
    streamed = tmp_path / "streamed"
    _assert_same(_dir_tensors(streamed), _dir_tensors(tmp_path / "plain"))
    # One shard per block, plus one for embeddings/head, with an index that names them all.
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    config, expected = (json.loads((d / "config.json").read_text()) for d in (streamed, tmp_path / "plain"))
    for c in (config, expected):
        c["family_config"].pop("_name_or_path", None)
    assert config == expected
    assert not staging_dir(streamed).exists()
    assert handle.slicing_stats and handle.config.attn_input_dims == plain.config.attn_input_dims
    loaded = AutoModelForCausalLM.from_pretrained(streamed)
    assert torch.equal(loaded(ids[:2]).logits, plain(ids[:2]).logits)


def test_streaming_refuses_a_directory_without_safetensors(tmp_path):
    from hf_slicegpt.runtime.streaming import StreamingError

    make_tiny("llama").config.save_pretrained(tmp_path)
    with pytest.raises(StreamingError, match="safetensors"):
        slice_checkpoint(tmp_path, calibration(4, 8), 0.25, tmp_path / "out", show_progress=False)


# -- resume -----------------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


class _CountingLayers(InMemoryLayers):
    """The in-memory source, recording which blocks are fetched and interrupting at ``stop_at``."""

    def __init__(self, model, stop_at: int | None = None):
        super().__init__(model.model.layers, torch.device("cpu"))
        self.fetched: list[int] = []
        self.stop_at = stop_at

    def fetch(self, idx, device):
        if idx == self.stop_at:
            raise _Interrupt
        self.fetched.append(idx)
        return super().fetch(idx, device)


def test_resume_after_an_interruption_is_bit_identical(reference, tmp_path):
    dense, ids, expected, stats = reference
    state = tmp_path / "state"
    first = copy.deepcopy(dense)
    with pytest.raises(_Interrupt):
        hf_slicegpt.slice_model(
            first, ids, 0.25, batch_size=4, checkpoint_dir=state, checkpoint_every=1, show_progress=False,
            source=_CountingLayers(first, stop_at=2),
        )  # fmt: skip
    assert json.loads((state / "state.json").read_text())["layers_done"] == 2

    second = copy.deepcopy(dense)
    source = _CountingLayers(second)
    resumed = hf_slicegpt.slice_model(
        second, ids, 0.25, batch_size=4, checkpoint_dir=state, checkpoint_every=1, resume=True,
        show_progress=False, source=source,
    )  # fmt: skip
    fetched = source.fetched
    assert fetched == [2, 3]  # the finished blocks were not recomputed
    _assert_same(_state(resumed), expected)
    assert _stats(resumed) == stats

    # A state made with other settings is refused, not silently mixed in.
    with pytest.raises(ResumeError, match="different slicing run"):
        hf_slicegpt.slice_model(
            copy.deepcopy(dense),
            ids,
            0.3,
            batch_size=4,
            checkpoint_dir=state,
            resume=True,
            show_progress=False,
        )


def test_a_plain_run_resumes_bit_identically_in_the_saved_frame(tmp_path):
    """Without the correction each update sums in the frame of its input basis; the frame is saved with the
    state, so a resumed run sums exactly as the uninterrupted one (a frame rebuilt from the basis would not)."""
    dense = make_tiny("llama", seed=0, num_hidden_layers=4)
    ids = calibration(16, 16, seed=1)
    config = slicing.SlicingConfig(sparsity=0.25, correction="none")
    expected = _state(
        hf_slicegpt.slice_model(copy.deepcopy(dense), ids, config, batch_size=4, show_progress=False)
    )
    state, first = tmp_path / "state", copy.deepcopy(dense)
    with pytest.raises(_Interrupt):
        hf_slicegpt.slice_model(
            first, ids, config, batch_size=4, checkpoint_dir=state, checkpoint_every=1, show_progress=False,
            source=_CountingLayers(first, stop_at=2),
        )  # fmt: skip
    second = copy.deepcopy(dense)
    resumed = hf_slicegpt.slice_model(
        second, ids, config, batch_size=4, checkpoint_dir=state, resume=True, show_progress=False,
        source=_CountingLayers(second),
    )  # fmt: skip
    _assert_same(_state(resumed), expected)


def test_resume_needs_a_checkpoint_dir():
    with pytest.raises(slicing.SlicingError, match="checkpoint_dir"):
        hf_slicegpt.slice_model(make_tiny("llama"), calibration(4, 8), 0.25, resume=True, show_progress=False)


_SLOW_SLICE = """
import sys, time
from hf_slicegpt.slicing import SlicingHooks
def slow(name, cov, signals, masks):
    if {delay} and name.startswith("layer"):
        time.sleep({delay})  # each layer waits: time for the test to see the state and kill us
    return cov
from hf_slicegpt.runtime.streaming import slice_checkpoint
from tiny import calibration
slice_checkpoint(sys.argv[1], calibration(16, 16, seed=1), 0.25, sys.argv[2], batch_size=4,
                 checkpoint_every=1, resume={resume}, show_progress=False, hooks=SlicingHooks(covariance=slow))
"""


def _slice_process(tmp_path: Path, output: Path, delay: float, resume: bool) -> subprocess.Popen:
    script = tmp_path / f"run_{delay}_{resume}.py"
    script.write_text(_SLOW_SLICE.format(delay=delay, resume=resume))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "dense"), str(output)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_mid_run_then_resume_gives_a_bit_identical_checkpoint(tmp_path):
    make_tiny("llama_tied", seed=0, num_hidden_layers=4).save_pretrained(tmp_path / "dense")
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    clean = _slice_process(tmp_path, clean_out, delay=0, resume=False)

    victim = _slice_process(tmp_path, killed_out, delay=3.0, resume=False)
    state = staging_dir(killed_out) / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if state.is_file() and json.loads(state.read_text())["layers_done"] >= 2:
            break
        time.sleep(0.05)
    assert victim.poll() is None, victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not killed_out.exists()
    done_before = json.loads(state.read_text())["layers_done"]
    assert 2 <= done_before < 4

    resumed = _slice_process(tmp_path, killed_out, delay=0, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[0]
    assert clean.wait(timeout=300) == 0, clean.communicate()[0]
    files = sorted(p.name for p in clean_out.iterdir())
    assert files == sorted(p.name for p in killed_out.iterdir())
    for name in files:
        if name.endswith((".safetensors", ".json")):
            assert (clean_out / name).read_bytes() == (killed_out / name).read_bytes(), name


# -- data-parallel calibration -----------------------------------------------------------------------------------
_DP_SLICE = """
import sys, torch
from safetensors.torch import save_file
from hf_slicegpt import slice_model
from hf_slicegpt.runtime import distributed
from tiny import calibration, make_tiny
distributed.init_from_environment("cpu")
sliced = slice_model(make_tiny("llama", seed=0, num_hidden_layers=3), calibration(32, 16, seed=3), 0.25,
                     batch_size=4, correction=sys.argv[2], show_progress=False)
if distributed.is_main_process():
    save_file({k: v.contiguous() for k, v in sliced.state_dict().items()}, sys.argv[1])
    print("calibration tokens", sliced.config.slicing["calibration_tokens"])
distributed.destroy()
"""


# plain updates sum in frames, corrected ones expand: both paths must reduce over ranks alike
@pytest.mark.parametrize("correction", ["ridge", "none"])
def test_two_processes_give_the_same_weights_as_one(tmp_path, correction):
    script = tmp_path / "dp.py"
    script.write_text(_DP_SLICE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        "OMP_NUM_THREADS": "1",
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors"), correction], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    two = subprocess.run([*torchrun, str(script), str(tmp_path / "two.safetensors"), correction], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "calibration tokens 512" in one.stdout and "calibration tokens 512" in two.stdout
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        assert (a[name] - b[name]).abs().max() / scale < 1e-6, name


# -- the CLI flags ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_low_memory_offload_and_checkpointing_write_the_plain_checkpoint(tmp_path):
    from cli_helpers import run_cli, save_tiny_checkpoint, write_corpus

    save_tiny_checkpoint(tmp_path / "dense", num_hidden_layers=3)
    write_corpus(tmp_path / "corpus.txt")
    common = [
        "--sparsity",
        "0.25",
        "--calibration",
        "corpus.txt",
        "--num-samples",
        "8",
        "--seq-len",
        "32",
        "-q",
    ]
    plain = run_cli("slice", "dense", "--output", "plain", *common, tmp=tmp_path)
    assert plain.returncode == 0, plain.stderr
    low = run_cli(
        "slice", "dense", "--output", "low", *common, "--low-memory", "--offload", "disk", "--checkpoint-every", "1",
        tmp=tmp_path,
    )  # fmt: skip
    assert low.returncode == 0, low.stderr
    _assert_same(_dir_tensors(tmp_path / "low"), _dir_tensors(tmp_path / "plain"))
    assert (tmp_path / "low" / "tokenizer.json").is_file() and (
        tmp_path / "low" / "slicing_report.json"
    ).is_file()
    assert not staging_dir(tmp_path / "low").exists()
    refused = run_cli("slice", "dense", "--output", "x", *common, "--low-memory", "--eval-data", "corpus.txt",
                      tmp=tmp_path)  # fmt: skip
    assert refused.returncode == 1 and "--low-memory does not evaluate" in refused.stderr
