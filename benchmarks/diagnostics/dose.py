"""#8 diagnostics: how much text of another kind the calibration needs. Each spec is ``SOURCE:K``.

``K`` of the 32 pydocs calibration windows are replaced by windows of ``SOURCE``: ``lic`` (all licences,
including the evaluated Apache licence: an oracle), ``licheld`` (the other licences only), ``git`` (git release
notes), ``syn`` (synthetic structured text). Prints perplexity relative to dense at 25%.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustness import ood_sources

import hf_slicegpt
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
dense = json.loads((Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json").read_text())  # variants.py
held = workdir / "lic-heldout"  # the evaluation's first 2048 licence tokens are all from Apache-2.0
held.mkdir()
for p in (workdir / "licenses").iterdir():
    if not p.name.startswith("Apache"):
        shutil.copy(p, held / p.name)
paths = {"lic": srcs["licenses"], "licheld": str(held), "git": srcs["git-notes"], "syn": srcs["synthetic"]}
for spec in sys.argv[1:]:
    name, k = spec.split(":")
    extra = calibration_tokens(tok, paths[name], num_samples=int(k), seq_len=512, seed=0)
    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    s = hf_slicegpt.slice_model(m, torch.cat([calib[: 32 - int(k)], extra]), 0.25, show_progress=False)
    r = {n: perplexity(s, v, batch_size=4, show_progress=False).perplexity for n, v in evals.items()}
    print(spec, {n: f"{r[n] / dense[n]:.2f}x({r[n]:.1f})" for n in r}, flush=True)
