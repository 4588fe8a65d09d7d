"""#8 diagnostics: variants of the vocabulary swap. Each spec is ``FRACTION:EXTRA:OFFSET[:MIN_ID[:rep]]``.

``EXTRA`` swapped copies of the first calibration windows are added to the 32 pydocs windows (``0``: the last 16
windows are swapped in place instead); ``OFFSET`` sets the replacement weights ``1 / (id + OFFSET)``; only token
ids >= ``MIN_ID`` are swapped or drawn (1000 leaves punctuation and function words alone). The library's
``swap:F`` is ``F:32:200``. ``rep``: each swapped window's second half repeats its first half, so every swapped
word is copied in context. ``EXTRA`` above 32 takes further copies with other seeds. Prints perplexity relative
to dense at 25%.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_model, setup

import hf_slicegpt

VOCAB = 49152
env = setup()
calib = env.calibration


def substitute(rows, fraction, offset, min_id, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(min_id, VOCAB)
    weights = 1.0 / (ids.double() + offset)
    out = rows.clone()
    for r in range(out.shape[0]):
        types = rows[r].unique()
        types = types[types >= min_id]
        chosen = types[torch.rand(len(types), generator=generator) < fraction]
        new = ids[torch.multinomial(weights, len(chosen), replacement=True, generator=generator)]
        for t, n in zip(chosen.tolist(), new.tolist()):
            out[r][rows[r] == t] = n
    return out


for spec in sys.argv[1:]:
    parts = spec.split(":")
    fraction, extra, offset = float(parts[0]), int(parts[1]), float(parts[2])
    min_id = int(parts[3]) if len(parts) > 3 else 17  # SmolLM2's ids 0-16 are special tokens
    repeat = len(parts) > 4 and parts[4] == "rep"
    if extra:
        copies = [substitute(calib, fraction, offset, min_id, seed=1 + i) for i in range(-(-extra // 32))]
        swapped = torch.cat(copies)[:extra]
        if repeat:
            half = swapped.shape[1] // 2
            swapped = torch.cat([swapped[:, :half], swapped[:, :half]], dim=1)
        c = torch.cat([calib, swapped])
    else:
        c = torch.cat([calib[:16], substitute(calib[16:], fraction, offset, min_id)])
    sliced = hf_slicegpt.slice_model(fresh_model(), c, 0.25, show_progress=False)
    print(spec, env.relative(sliced), flush=True)
