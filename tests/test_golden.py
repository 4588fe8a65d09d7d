"""Golden hashes: the slicing engine's refactors change no numbers.

Every tiny family is sliced in every mode, and the SHA-256 of the sliced state dict is compared with the hash
pinned in ``tests/golden/hashes.json`` before the engine was rebuilt. A refactor that changes one bit of one
weight in one mode fails here. To re-pin after a *deliberate* change of numbers (never for a refactor), run
``python tests/test_golden.py --write`` and say why in the commit.

Float results depend on the CPU's kernels; the hashes are pinned on the project's machines (2-core x86 CI).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import FAMILIES, calibration, make_tiny

import hf_slicegpt
from hf_slicegpt.checkpoint.export import to_native
from hf_slicegpt.runtime.streaming import slice_checkpoint

HASHES = Path(__file__).parent / "golden" / "hashes.json"
SPARSITY = 0.25
# The paper's numbers, pinned before the engine was rebuilt: the output-aware correction is off here (its own
# modes below are pinned separately).
PAPER = hf_slicegpt.SlicingConfig(sparsity=SPARSITY, correction="none")
NATIVE = ("gemma", "llama", "llama3", "llama_tied", "mistral", "qwen2", "qwen3")


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _slice(family: str, **kwargs) -> hf_slicegpt.SlicedModelForCausalLM:
    dense = make_tiny(family, seed=0)
    kwargs.setdefault("correction", "none")
    return hf_slicegpt.slice_model(
        dense, calibration(8, 16, seed=1), SPARSITY, batch_size=4, show_progress=False, **kwargs
    )


def _state(model: torch.nn.Module) -> str:
    return digest(dict(model.state_dict()))


def _low_memory(family: str, tmp: Path) -> str:
    make_tiny(family, seed=0).save_pretrained(tmp / "dense")
    slice_checkpoint(
        tmp / "dense", calibration(8, 16, seed=1), PAPER, tmp / "out", batch_size=4, show_progress=False
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted((tmp / "out").glob("*.safetensors")):
        tensors.update(load_file(file))
    return digest(tensors)


def _resume(family: str, tmp: Path) -> str:
    ids = calibration(8, 16, seed=1)
    hf_slicegpt.slice_model(
        make_tiny(family, seed=0),
        ids,
        PAPER,
        batch_size=4,
        show_progress=False,
        checkpoint_dir=tmp / "state",
    )
    return _state(
        hf_slicegpt.slice_model(
            make_tiny(family, seed=0),
            ids,
            PAPER,
            batch_size=4,
            show_progress=False,
            checkpoint_dir=tmp / "state",
            resume=True,
        )
    )


MODES: dict[str, Callable[[str, Path], str]] = {
    "layer-const": lambda f, _: _state(_slice(f)),
    "layer-variance": lambda f, _: _state(_slice(f, schedule="variance")),
    "global": lambda f, _: _state(_slice(f, rotation="global")),
    "disk-offload": lambda f, _: _state(_slice(f, offload="disk")),
    "low-memory": _low_memory,
    "resume": _resume,
    "native": lambda f, _: _state(to_native(_slice(f, rotation="global", round_to=4))),
    # the output-aware correction (the default since issue 17): writers and shortcuts refit, pinned when it was
    # wired in; since 2026-12-03 the default refits only the writers ("layer-ridge", re-pinned then)
    "layer-ridge-shortcuts": lambda f, _: _state(_slice(f, correction="ridge", correction_shortcuts=True)),
    "layer-ridge": lambda f, _: _state(_slice(f, correction="ridge")),
    "global-ridge": lambda f, _: _state(_slice(f, rotation="global", correction="ridge")),
}
# The low-memory path does not handle Gemma's scaled embedding module or GPT-NeoX's ``embed_out`` head (it
# refuses them with a StreamingError or fails to rebuild the skeleton); noted in the engine issue.
NO_LOW_MEMORY = ("gemma", "gpt_neox", "gpt_neox_sequential")
CASES = [
    (f, m)
    for f in FAMILIES
    for m in MODES
    if (m != "native" or f in NATIVE) and (m != "low-memory" or f not in NO_LOW_MEMORY)
]


def compute(family: str, mode: str, tmp: Path) -> str:
    torch.manual_seed(0)
    return MODES[mode](family, tmp)


@pytest.fixture(scope="module")
def pinned() -> dict[str, str]:
    return json.loads(HASHES.read_text())


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_sliced_weights_match_the_pinned_hash(family, mode, pinned, tmp_path):
    assert compute(family, mode, tmp_path) == pinned[f"{family}/{mode}"]


def test_every_case_is_pinned(pinned):
    assert sorted(pinned) == sorted(f"{f}/{m}" for f, m in CASES)


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    out = {}
    for family, mode in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            out[f"{family}/{mode}"] = compute(family, mode, Path(tmp))
    HASHES.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(out)} hashes to {HASHES}")
