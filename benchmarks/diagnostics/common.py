"""What the robustness diagnostics share: SmolLM2, 32 x 512 pydocs calibration, the evaluation windows, dense."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustness import ood_sources  # noqa: E402

from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens  # noqa: E402
from hf_slicegpt.workflows.evaluation import perplexity  # noqa: E402
from hf_slicegpt.workflows.loading import load_model_and_tokenizer  # noqa: E402

EVAL_TOKENS = 2048  # 4 x 512-token windows per source
DENSE_CACHE = Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json"


@dataclass
class Setup:
    tokenizer: object
    calibration: torch.Tensor  # 32 x 512 pydocs windows, seed 0
    sources: dict[str, str]  # out-of-domain text sources by name (robustness.ood_sources)
    evals: dict[str, torch.Tensor]  # "in" (held-out pydocs) and each out-of-domain source
    dense: dict[str, float]  # the dense model's perplexities, cached across scripts
    workdir: Path

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        return {
            name: perplexity(model, ids, batch_size=4, show_progress=False).perplexity
            for name, ids in self.evals.items()
        }

    def relative(self, model: torch.nn.Module) -> dict[str, str]:
        """Perplexity relative to dense (and absolute) per source, as the diagnostics print it."""
        ppl = self.measure(model)
        return {name: f"{ppl[name] / self.dense[name]:.2f}x({ppl[name]:.1f})" for name in ppl}


def setup() -> Setup:
    """One torch thread (two scripts can run side by side on 2 cores); the dense perplexities are cached."""
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp())
    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    calibration = calibration_tokens(tokenizer, "pydocs", num_samples=32, seq_len=512, seed=0)
    sources = ood_sources(workdir)
    evals = {"in": evaluation_tokens(tokenizer, "pydocs", seq_len=512, max_tokens=EVAL_TOKENS)}
    for name, source in sources.items():
        evals[name] = evaluation_tokens(tokenizer, source, seq_len=512, max_tokens=EVAL_TOKENS, split="all")
    result = Setup(tokenizer, calibration, sources, evals, {}, workdir)
    if not DENSE_CACHE.exists():
        DENSE_CACHE.write_text(json.dumps(result.measure(model)))
    result.dense = json.loads(DENSE_CACHE.read_text())
    return result


def fresh_model() -> torch.nn.Module:
    """A new dense SmolLM2 (slice_model consumes the one it is given)."""
    return load_model_and_tokenizer("smollm2", dtype="float32")[0]
