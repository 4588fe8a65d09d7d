"""Which layers' slicing breaks OOD text? Slice only layer outputs in [a, b) (embedding if a < 0)."""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustness import ood_sources

import hf_slicegpt
from hf_slicegpt import slicing
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

torch.set_num_threads(1)
ranges = [tuple(int(x) for x in r.split(":")) for r in sys.argv[1].split(",")]
EVT = 2048
workdir = Path(tempfile.mkdtemp())
_, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=32, seq_len=512, seed=0)
srcs = ood_sources(workdir)
evals = {
    "in": evaluation_tokens(tok, "pydocs", seq_len=512, max_tokens=EVT),
    "licenses": evaluation_tokens(tok, srcs["licenses"], seq_len=512, max_tokens=EVT, split="all"),
}
dense = json.loads(Path(str(Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json")).read_text())
H = 576  # SmolLM2's hidden size
for a, b in ranges:

    def plan(p, a=a, b=b):
        p.embedding = p.embedding if a < 0 else H
        p.outputs = [w if max(a, 0) <= i < b else H for i, w in enumerate(p.outputs)]
        p.mids = [w if max(a, 0) <= i < b else H for i, w in enumerate(p.mids)]
        return p

    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    t = time.time()
    s = hf_slicegpt.slice_model(m, calib, 0.25, show_progress=False, hooks=slicing.SlicingHooks(plan=plan))
    r = {k: perplexity(s, v, batch_size=4, show_progress=False).perplexity for k, v in evals.items()}
    print(
        f"[{a},{b})",
        f"{time.time() - t:.0f}s",
        {k: f"{r[k] / dense[k]:.2f}x({r[k]:.1f})" for k in r},
        flush=True,
    )
