"""The inference benchmark's FLOP ideal and its summary figures (benchmarks/inference_speed.py)."""

from __future__ import annotations

import importlib.util
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "inference_speed.py"
_SPEC = importlib.util.spec_from_file_location("inference_speed", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 6, 8, generator=g) for _ in range(3)]


def test_attention_core_counts_on_cpu(qkv):
    """torch's own counter gives the CPU kernel 0 FLOPs; the benchmark counts 2 (d_qk + d_v) per pair."""
    q, k, v = qkv
    assert bench.count_flops(lambda: sdpa(q, k, v)) == 2 * (2 * 3 * 6 * 6) * (8 + 8)


def test_causal_attention_counts_the_pairs_it_computes(qkv):
    q, k, v = qkv
    pairs = 2 * 3 * (1 + 2 + 3 + 4 + 5 + 6)
    assert bench.count_flops(lambda: sdpa(q, k, v, is_causal=True)) == 2 * pairs * 16
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    assert bench.count_flops(lambda: sdpa(q, k, v, attn_mask=mask)) == 2 * pairs * 16
    additive = torch.zeros(6, 6).masked_fill(~mask, float("-inf"))
    assert bench.count_flops(lambda: sdpa(q, k, v, attn_mask=additive)) == 2 * pairs * 16


def test_a_decode_step_attends_every_cached_key(qkv):
    q, k, v = qkv
    assert bench.count_flops(lambda: sdpa(q[:, :, :1], k, v)) == 2 * (2 * 3 * 6) * 16


def test_realised_share_of_the_gain():
    assert bench.realised(1.15, 1.30) == pytest.approx(0.5)
    assert bench.realised(1.30, 1.30) == pytest.approx(1.0)
    assert bench.realised(0.97, 1.17) < 0
    assert math.isnan(bench.realised(1.1, 1.0))


def test_summary_pairs_rounds_and_uses_medians():
    times = {"dense": [10.0, 12.0, 11.0], "sliced": [8.0, 12.0, 10.0]}
    rows = bench.summarise(times, {"dense": 130, "sliced": 100}, per=1000)
    sliced = rows["sliced"]
    assert sliced["ideal"] == pytest.approx(1.3)
    assert sliced["speedup"] == pytest.approx(11.0 / 10.0)
    assert sliced["paired_speedup"]["median"] == pytest.approx(1.1)  # 10/8, 12/12, 11/10
    assert sliced["paired_speedup"]["min"] == pytest.approx(1.0)
    assert sliced["throughput"] == pytest.approx(100.0)
    assert sliced["best_speedup"] == pytest.approx(10.0 / 8.0)
    assert sliced["best_realised"] == pytest.approx(0.25 / 0.3)


@pytest.mark.parametrize("sliced", [False, True])
def test_the_decoder_uses_its_cache_for_dense_and_sliced(sliced: bool):
    """Greedy tokens decoded step by step through the static cache equal greedy tokens of full forwards.

    The dense model once ignored a cache passed under the wrong keyword and attended to the current token only.
    """
    from tiny import calibration, make_tiny

    import hf_slicegpt

    torch.manual_seed(0)
    model = make_tiny("llama")
    if sliced:
        model = hf_slicegpt.slice_model(model, calibration(), 0.25, round_to=4, show_progress=False)
    model.eval()
    prompt = calibration(1, 8, seed=5)
    decoder = bench.Decoder(model, prompt_len=8, tokens=3, device=torch.device("cpu"), compile=False)
    first = decoder.start(prompt)
    tokens = torch.cat([first, decoder.steps(first)], 1)
    with torch.no_grad():
        full = model(torch.cat([prompt, tokens], 1)).logits[:, 7:-1].argmax(-1)
    assert torch.equal(tokens, full)


def test_compile_options_parse_literals_and_strings():
    """``--compile-options`` become inductor settings with their Python types; a misspelt name is refused."""
    options = bench.compile_options(["freezing=True", "max_autotune_gemm_backends=CPP,ATEN", "cpp.threads=2"])
    assert options == {"freezing": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp.threads": 2}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.compile_options(["freezing"])
    with pytest.raises(ValueError, match="'freezng' is not a torch._inductor.config setting"):
        bench.compile_options(["freezng=True"])


def test_agreement_counts_tokens_up_to_the_first_difference():
    """The benchmark's check that compile settings leave the decoded tokens alone can fail."""
    from tiny import calibration, make_tiny

    torch.manual_seed(0)
    model = make_tiny("llama").eval()
    prompt = calibration(1, 8, seed=5)
    decoder = bench.Decoder(model, prompt_len=8, tokens=4, device=torch.device("cpu"), compile=False)
    assert decoder.agreement(prompt) == 4

    def shifted(**kwargs):  # a "compiled" step whose argmax is off by one from the second step on
        out = model(**kwargs)
        if kwargs["position_ids"].item() > 8:
            out.logits = out.logits.roll(1, dims=-1)
        return out

    decoder.step = shifted
    assert decoder.agreement(prompt) == 1


class _FakeLibc:
    def __init__(self, answer: int) -> None:
        self.answer, self.calls = answer, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_steady_allocator_sets_both_thresholds():
    libc = _FakeLibc(answer=1)
    applied = bench.steady_allocator(libc)
    assert sorted(libc.calls) == [(-3, 2**31 - 1), (-1, 2**31 - 1)]
    assert applied == {"M_TRIM_THRESHOLD": 2**31 - 1, "M_MMAP_THRESHOLD": 2**31 - 1}


def test_steady_allocator_refusal_names_the_way_out():
    with pytest.raises(RuntimeError, match="mallopt.*--allocator default"):
        bench.steady_allocator(_FakeLibc(answer=0))
    assert bench.steady_allocator(object()) == {}  # a C library without mallopt: nothing to set


_FAULTS_CHILD = """
import importlib.util, resource, sys, torch
spec = importlib.util.spec_from_file_location("inference_speed", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        buffer = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest adaptive mmap threshold
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
assert bench.steady_allocator()
faults()  # the first use after the switch grows the heap once
print(default, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_allocator_stops_page_faults_on_repeated_buffers():
    """The default allocator faults a 64 MiB buffer back in on every use (16k pages); steady reuses it."""
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_CHILD, str(_PATH)], capture_output=True, text=True, check=True
    )
    default, steady = (int(n) for n in out.stdout.split()[-2:])
    assert default > 10 * 16_000
    assert steady < 2_000
