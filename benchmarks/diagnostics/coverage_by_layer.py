"""#8 diagnostics: in which layers does the calibration need licence text? Specs like ``e+0-4``, ``15-29``.

Calibration is 16 pydocs + 16 licence windows, but the licence windows count only in the covariance of the
selected signals (``e``: the embeddings; ``A-B``: every signal of layers A..B; ``none``: nowhere).
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_model, setup

import hf_slicegpt
from hf_slicegpt import slicing
from hf_slicegpt.slicing.pca import Covariance
from hf_slicegpt.workflows.data import calibration_tokens

env = setup()
calib = env.calibration
lic = calibration_tokens(env.tokenizer, env.sources["licenses"], num_samples=16, seq_len=512, seed=0)
batches = [{"input_ids": x} for x in (calib[:8], calib[8:16], lic[:8], lic[8:16])]  # pydocs first
for spec in sys.argv[1:]:
    layers, emb = set(), False
    for part in spec.split("+"):
        if part == "e":
            emb = True
        elif part != "none":
            a, b = map(int, part.split("-"))
            layers |= set(range(a, b + 1))

    def covariance(name, full, signals, masks, layers=layers, emb=emb):
        """Re-sum the signal from the pydocs batches only, unless licence text counts at this depth."""
        found = re.match(r"layer (\d+)", name)
        use = emb if name == "embeddings" else (found is not None and int(found.group(1)) in layers)
        if use:
            return full
        cov = Covariance(full.width, device=full.sum.device, name=name, precision=full.precision)
        for signal, mask in list(zip(signals, masks))[:2]:
            cov.add(signal, mask)
        return cov

    hooks = slicing.SlicingHooks(covariance=covariance)
    sliced = hf_slicegpt.slice_model(fresh_model(), batches, 0.25, show_progress=False, hooks=hooks)
    print(spec, env.relative(sliced), flush=True)
