"""#8 diagnostics: variants of the vocabulary swap. Each spec is ``FRACTION:EXTRA:OFFSET[:MIN_ID[:rep]]``.

``EXTRA`` swapped copies of the first calibration windows are added to the 32 pydocs windows (``0``: the last 16
windows are swapped in place instead); ``OFFSET`` sets the replacement weights ``1 / (id + OFFSET)``; only token
ids >= ``MIN_ID`` are swapped or drawn (1000 leaves punctuation and function words alone). The library's
``swap:F`` is ``F:32:200``. ``rep``: each swapped window's second half repeats its first half, so every swapped
word is copied in context. ``EXTRA`` above 32 takes further copies with other seeds. Prints perplexity relative
to dense at 25%.
"""

import json
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
VOCAB = 49152
workdir = Path(tempfile.mkdtemp())
_, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=32, seq_len=512, seed=0)
srcs = ood_sources(workdir)
evals = {"in": evaluation_tokens(tok, "pydocs", seq_len=512, max_tokens=EVT)}
for k in srcs:
    evals[k] = evaluation_tokens(tok, srcs[k], seq_len=512, max_tokens=EVT, split="all")
dense = json.loads((Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json").read_text())  # variants.py


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
    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    s = hf_slicegpt.slice_model(m, c, 0.25, show_progress=False)
    r = {k: perplexity(s, v, batch_size=4, show_progress=False).perplexity for k, v in evals.items()}
    print(spec, {k: f"{r[k] / dense[k]:.2f}x({r[k]:.1f})" for k in r}, flush=True)
