"""#8 diagnostics: in which layers does the calibration need licence text? Specs like ``e+0-4``, ``15-29``.

Calibration is 16 pydocs + 16 licence windows, but the licence windows count only in the covariance of the
selected signals (``e``: the embeddings; ``A-B``: every signal of layers A..B; ``none``: nowhere).
"""

import json
import re
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
from hf_slicegpt.pca import Covariance

torch.set_num_threads(1)
EVT = 2048
workdir = Path(tempfile.mkdtemp())
_, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=32, seq_len=512, seed=0)
srcs = ood_sources(workdir)
evals = {"in": evaluation_tokens(tok, "pydocs", seq_len=512, max_tokens=EVT)}
for k in srcs:
    evals[k] = evaluation_tokens(tok, srcs[k], seq_len=512, max_tokens=EVT, split="all")
dense = json.loads((Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json").read_text())  # variants.py
lic = calibration_tokens(tok, srcs["licenses"], num_samples=16, seq_len=512, seed=0)
batches = [{"input_ids": x} for x in (calib[:8], calib[8:16], lic[:8], lic[8:16])]  # pydocs first
for spec in sys.argv[1:]:
    layers, emb = set(), False
    for part in spec.split("+"):
        if part == "e":
            emb = True
        elif part != "none":
            a, b = map(int, part.split("-"))
            layers |= set(range(a, b + 1))

    def covariance(self, signals, masks, name, layers=layers, emb=emb):
        found = re.match(r"layer (\d+)", name)
        use = emb if name == "embeddings" else (found is not None and int(found.group(1)) in layers)
        cov = Covariance(self.hidden, device=self.device, name=name, precision=self.covariance_precision)
        for i, (signal, mask) in enumerate(zip(signals, masks)):
            if i < 2 or use:
                cov.add(signal, mask)
        return cov

    slicing._Slicer._covariance = covariance
    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    s = hf_slicegpt.slice_model(m, batches, 0.25, show_progress=False)
    r = {n: perplexity(s, v, batch_size=4, show_progress=False).perplexity for n, v in evals.items()}
    print(spec, {n: f"{r[n] / dense[n]:.2f}x({r[n]:.1f})" for n in r}, flush=True)
