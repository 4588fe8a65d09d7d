"""How far the fused inference path is from the plain one: fp32 on every tiny family, and bf16 on SmolLM2.

The fused path computes the same products in another order (one GEMM on the normed stream, the shortcut's
columns rescaled by ``rms(x)``), so its logits differ from the plain path's by rounding only. This script puts
numbers on that:

- ``tiny``: every tiny random family of the test suite, per-layer and global rotation, sliced at 25%: the
  largest relative difference of the fused prefill and cached-decode logits from the plain ones (fp32; the
  tests assert < 1e-5);
- ``smollm2``: SmolLM2-135M sliced at 25% (per-layer, 16 x 512 pydocs windows, seed 42, no correction), then
  held-out pydocs windows in bf16: each path's relative logit error against the fp32 plain model, and the mean
  next-token loss (NLL) of each.

    .venv/bin/python benchmarks/fused_numerics.py --json benchmarks/results/fused_numerics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_slicegpt
from hf_slicegpt.modeling.modeling_sliced import CACHE_NAME
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import FAMILIES, calibration, make_tiny  # noqa: E402

logger = logging.getLogger("fused_numerics")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the largest magnitude: the tests' measure."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def _prefill_and_step(model, ids: torch.Tensor, fused: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_fused_inference(fused)
    out = model(input_ids=ids[:, :-1], use_cache=True)
    step = model(input_ids=ids[:, -1:], **{CACHE_NAME: getattr(out, CACHE_NAME)}, use_cache=True)
    return out.logits, step.logits


def tiny_families() -> dict[str, float]:
    """Fused against plain, fp32, per family and rotation: the larger of the prefill's and the step's error."""
    worst = {}
    for family in FAMILIES:
        for rotation in ("layer", "global"):
            model = hf_slicegpt.slice_model(
                make_tiny(family), calibration(), 0.25, round_to=4, rotation=rotation, show_progress=False
            )
            ids = calibration(3, 12, seed=7)
            plain, fused = _prefill_and_step(model, ids, False), _prefill_and_step(model, ids, True)
            worst[f"{family}/{rotation}"] = max(_relative(f, p) for f, p in zip(fused, plain))
    return worst


@torch.no_grad()
def smollm2_bf16(checkpoint: Path, eval_tokens: int) -> dict[str, dict[str, float]]:
    """Each path in bf16 against the fp32 plain model on held-out pydocs: relative logit error and mean NLL."""
    _, tokenizer = load_model_and_tokenizer(str(checkpoint), dtype="float32")
    ids = evaluation_tokens(tokenizer, "pydocs", seq_len=256, max_tokens=eval_tokens)

    def run(dtype: torch.dtype, fused: bool) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
        model.set_fused_inference(fused)
        return model(input_ids=ids).logits.float()

    def nll(logits: torch.Tensor) -> float:
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1)).item()

    reference = run(torch.float32, False)
    rows = {"fp32 plain": {"relative_error": 0.0, "nll": nll(reference)}}
    for fused in (False, True):
        logits = run(torch.bfloat16, fused)
        error = ((logits - reference).norm() / reference.norm()).item()
        rows[f"bf16 {'fused' if fused else 'plain'}"] = {"relative_error": error, "nll": nll(logits)}
    return rows


def sliced_smollm2(out: Path) -> Path:
    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    windows = calibration_tokens(tokenizer, "pydocs", num_samples=16, seq_len=512, seed=42)
    config = hf_slicegpt.SlicingConfig(sparsity=0.25, correction="none")
    hf_slicegpt.slice_model(model, windows, config=config, show_progress=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="a sliced SmolLM2 (default: slice one here)")
    parser.add_argument(
        "--eval-tokens", type=int, default=2048, help="held-out pydocs tokens (256-long windows)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    results = {"tiny_fp32_fused_vs_plain": tiny_families()}
    worst = max(results["tiny_fp32_fused_vs_plain"].items(), key=lambda item: item[1])
    print(f"tiny families, fp32, fused vs plain: worst {worst[1]:.2e} ({worst[0]}); the tests assert < 1e-5")
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(args.checkpoint) if args.checkpoint else sliced_smollm2(Path(work) / "sliced")
        results["smollm2_25_bf16"] = smollm2_bf16(checkpoint, args.eval_tokens)
    print(
        "\n| SmolLM2 25%, held-out pydocs | logits' relative error vs fp32 plain | mean NLL |\n|---|---|---|"
    )
    for name, row in results["smollm2_25_bf16"].items():
        print(f"| {name} | {row['relative_error']:.4f} | {row['nll']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
