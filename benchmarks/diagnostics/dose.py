"""#8 diagnostics: how much text of another kind the calibration needs. Each spec is ``SOURCE:K``.

``K`` of the 32 pydocs calibration windows are replaced by windows of ``SOURCE``: ``lic`` (all licences,
including the evaluated Apache licence: an oracle), ``licheld`` (the other licences only), ``git`` (git release
notes), ``syn`` (synthetic structured text). Prints perplexity relative to dense at 25%.
"""

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_model, setup

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens

env = setup()
tok, calib, srcs, workdir = env.tokenizer, env.calibration, env.sources, env.workdir
held = workdir / "lic-heldout"  # the evaluation's first 2048 licence tokens are all from Apache-2.0
held.mkdir()
for p in (workdir / "licenses").iterdir():
    if not p.name.startswith("Apache"):
        shutil.copy(p, held / p.name)
paths = {"lic": srcs["licenses"], "licheld": str(held), "git": srcs["git-notes"], "syn": srcs["synthetic"]}
for spec in sys.argv[1:]:
    name, k = spec.split(":")
    extra = calibration_tokens(tok, paths[name], num_samples=int(k), seq_len=512, seed=0)
    sliced = hf_slicegpt.slice_model(
        fresh_model(), torch.cat([calib[: 32 - int(k)], extra]), 0.25, show_progress=False
    )
    print(spec, env.relative(sliced), flush=True)
