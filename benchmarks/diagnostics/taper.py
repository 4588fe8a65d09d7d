import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "/work/main/benchmarks")
from robustness import ood_sources

import hf_slicegpt
from hf_slicegpt import slicing
from hf_slicegpt.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.evaluation import perplexity
from hf_slicegpt.loading import load_model_and_tokenizer

torch.set_num_threads(1)
EVT = 2048
workdir = Path(tempfile.mkdtemp())
_, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=32, seq_len=512, seed=0)
srcs = ood_sources(workdir)
evals = {"in": evaluation_tokens(tok, "pydocs", seq_len=512, max_tokens=EVT)}
for k in srcs:
    evals[k] = evaluation_tokens(tok, srcs[k], seq_len=512, max_tokens=EVT, split="all")
dense = json.loads(Path(str(Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json")).read_text())
orig = slicing._Slicer._const_plan
for spec in sys.argv[1:]:
    emb, a, b, c = (int(x) for x in spec.split(":"))

    def plan(self, n, emb=emb, a=a, b=b, c=c):
        p = orig(self, n)
        p.embedding = emb
        p.outputs = [a if i < 10 else b if i < 20 else c for i in range(n - 1)] + [p.outputs[-1]]
        p.mids = list(p.outputs)
        return p

    slicing._Slicer._const_plan = plan
    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    s = hf_slicegpt.slice_model(m, calib, 0.25, show_progress=False)
    n = sum(p.numel() for p in s.parameters())
    r = {k: perplexity(s, v, batch_size=4, show_progress=False).perplexity for k, v in evals.items()}
    print(spec, n, {k: f"{r[k] / dense[k]:.2f}x({r[k]:.1f})" for k in r}, flush=True)
