"""#8 diagnostics: variants of the covariance, in-domain vs OOD, per-token damage.

Covariance variants go through the public ``SlicingHooks.covariance`` hook: ``tokennorm`` re-sums each sliced
signal's covariance from per-token unit-RMS signals, ``allpriorA`` adds a vocabulary prior to every signal.
(The old ``varnorm`` variant patched the dense pass; that pass already weighs tokens equally for the variance
schedule's spectra, so it is gone.)
"""

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustness import ood_sources

import hf_slicegpt
from hf_slicegpt.slicing import Covariance, SlicingHooks
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.evaluation import perplexity
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

logging.basicConfig(level=logging.WARNING)
logging.getLogger("hf_slicegpt.slicing").setLevel(logging.INFO)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["plain", "tokennorm"]
NS = int(sys.argv[3]) if len(sys.argv) > 3 else 32
SP = float(sys.argv[4]) if len(sys.argv) > 4 else 0.25
EVT = 2048


def token_normalised(name, cov, signals, masks):
    """The covariance of the same signals with every token scaled to unit RMS."""
    if not signals:
        return cov
    out = Covariance(cov.width, device=cov.sum.device, name=name, precision=cov.precision)
    for signal, mask in zip(signals, masks):
        x = signal.to(torch.float32)
        out.add(x / x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt(), mask)
    return out


workdir = Path(tempfile.mkdtemp())
model, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=NS, seq_len=512, seed=0)
evals = {"in": evaluation_tokens(tok, "pydocs", seq_len=512, max_tokens=EVT)}
for name, src in ood_sources(workdir).items():
    evals[name] = evaluation_tokens(tok, src, seq_len=512, max_tokens=EVT, split="all")


def measure(m):
    return {k: perplexity(m, v, batch_size=4, show_progress=False).perplexity for k, v in evals.items()}


cache = Path(str(Path(tempfile.gettempdir()) / "hf_slicegpt_diag_dense.json"))
if cache.exists():
    dense = json.loads(cache.read_text())
else:
    dense = measure(model)
    cache.write_text(json.dumps(dense))
print("dense", {k: round(v, 2) for k, v in dense.items()}, flush=True)
for v in variants:
    m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
    transforms = [token_normalised] if "tokennorm" in v else []
    kw = {}
    c = calib
    if "oraclelic" in v:
        c = calibration_tokens(tok, str(workdir / "licenses"), num_samples=NS, seq_len=512, seed=0)
    if "mixlic" in v:
        c = torch.cat(
            [
                calib[: NS // 2],
                calibration_tokens(tok, str(workdir / "licenses"), num_samples=NS // 2, seq_len=512, seed=0),
            ]
        )
    if "aug" in v:
        from hf_slicegpt.workflows.augment import self_generated_tokens

        if "aug128" in v:
            g = self_generated_tokens(m, tok, 128, 128, top_p=1.0, show_progress=False)
            c = [{"input_ids": calib[i : i + 8]} for i in range(0, calib.shape[0], 8)] + [
                {"input_ids": g[i : i + 32]} for i in range(0, g.shape[0], 32)
            ]
        else:
            c = torch.cat([calib, self_generated_tokens(m, tok, 32, 512, show_progress=False)])
    import re as _re

    mm = _re.search(r"(?<!all)prior([0-9.]+)", v)
    if mm:
        kw["vocab_prior"] = float(mm.group(1))
    mm2 = _re.search(r"allprior([0-9.]+)", v)
    if mm2:
        E = m.get_input_embeddings().weight.detach().to(torch.float64)
        P = E.T @ E
        P = P / P.trace()
        alpha = float(mm2.group(1))

        def _prior(name, c, signals, masks, alpha=alpha, P=P):
            if signals:
                sq = torch.cat([x.reshape(-1, x.shape[-1]).float().pow(2).sum(-1) for x in signals])
                c.sum += alpha * c.tokens * sq.median().item() * P.to(c.sum.device)
            return c

        transforms.append(_prior)

    def _hook(name, c, signals, masks, transforms=transforms):
        for transform in transforms:
            c = transform(name, c, signals, masks)
        return c

    kw["hooks"] = SlicingHooks(covariance=_hook) if transforms else None
    if "variance" in v:
        kw["schedule"] = "variance"
    kw["shared_mid_tolerance"] = float("inf") if "tolinf" in v else 2.0
    if "sharedmid" in v:
        kw["mid_basis"] = "shared"
    if "global" in v:
        kw["rotation"] = "global"
    t = time.time()
    s = hf_slicegpt.slice_model(m, c, SP, show_progress=False, **kw)
    r = measure(s)
    print(
        v,
        s.config.embedding_dim,
        s.config.attn_input_dims,
        sum(p.numel() for p in s.parameters()),
        flush=True,
    )
    print(v, f"{time.time() - t:.0f}s", {k: f"{r[k] / dense[k]:.2f}x({r[k]:.1f})" for k in r}, flush=True)
