"""#8 diagnostics: depth-tapered widths. Each spec is ``emb,a,b,c,head[,ma,mb,mc]``.

``a``/``b``/``c`` are the block output widths of blocks 0-9, 10-19 and 20-28 (block 29's output is ``head``);
``ma``/``mb``/``mc`` the mid (attention output) widths of the same thirds, defaulting to ``a``/``b``/``c``.
SmolLM2 only (30 blocks). Prints parameters and perplexity relative to dense for each spec.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustness import ood_sources

import hf_slicegpt
from hf_slicegpt import slicing
from hf_slicegpt.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.evaluation import perplexity
from hf_slicegpt.loading import load_model_and_tokenizer

torch.set_num_threads(1)
EVT = 2048
workdir = Path(tempfile.mkdtemp())
dense_model, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=32, seq_len=512, seed=0)
srcs = ood_sources(workdir)
evals = {"in": evaluation_tokens(tok, "pydocs", seq_len=512, max_tokens=EVT)}
for k in srcs:
    evals[k] = evaluation_tokens(tok, srcs[k], seq_len=512, max_tokens=EVT, split="all")


def measure(m):
    return {k: perplexity(m, v, batch_size=4, show_progress=False).perplexity for k, v in evals.items()}


cache = Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json"
if not cache.exists():
    cache.write_text(json.dumps(measure(dense_model)))
dense = json.loads(cache.read_text())
del dense_model
orig = slicing._Slicer._const_plan


def thirds(i, a, b, c):
    return a if i < 10 else b if i < 20 else c


for spec in sys.argv[1:]:
    v = [int(x) for x in spec.split(",")]
    emb, a, b, c, head = v[:5]
    ma, mb, mc = v[5:8] if len(v) > 5 else (a, b, c)

    def plan(self, n, emb=emb, a=a, b=b, c=c, head=head, ma=ma, mb=mb, mc=mc):
        p = orig(self, n)
        p.embedding = emb
        p.outputs = [thirds(i, a, b, c) for i in range(n - 1)] + [head]
        p.mids = [thirds(i, ma, mb, mc) for i in range(n)]
        return p

    slicing._Slicer._const_plan = plan
    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    s = hf_slicegpt.slice_model(m, calib, 0.25, show_progress=False)
    n = sum(p.numel() for p in s.parameters())
    r = measure(s)
    print(spec, n, {k: f"{r[k] / dense[k]:.2f}x({r[k]:.1f})" for k in r}, flush=True)
