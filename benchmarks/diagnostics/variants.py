"""#8 diagnostics: variants of the covariance, in-domain vs OOD, per-token damage."""

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "/work/main/benchmarks")
from robustness import ood_sources

import hf_slicegpt
from hf_slicegpt import pca
from hf_slicegpt.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.evaluation import perplexity
from hf_slicegpt.loading import load_model_and_tokenizer

logging.basicConfig(level=logging.WARNING)
logging.getLogger("hf_slicegpt.slicing").setLevel(logging.INFO)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["plain", "tokennorm"]
NS = int(sys.argv[3]) if len(sys.argv) > 3 else 32
SP = float(sys.argv[4]) if len(sys.argv) > 4 else 0.25
EVT = 2048
orig_add = pca.Covariance.add


def norm_add(self, signal, mask=None):
    s = signal.to(torch.float32)
    s = s / s.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
    return orig_add(self, s, mask)


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
    pca.Covariance.add = norm_add if "tokennorm" in v else orig_add
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
        from hf_slicegpt.augment import self_generated_tokens

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
        alpha = float(mm2.group(1))
        from hf_slicegpt import slicing as _sl

        E = m.get_input_embeddings().weight.detach().to(torch.float64)
        P = E.T @ E
        P = P / P.trace()
        _orig_cov = _sl._Slicer._covariance

        def _cov(self, signals, masks, name, _o=_orig_cov, alpha=alpha, P=P):
            c = _o(self, signals, masks, name)
            sq = torch.cat([x.reshape(-1, x.shape[-1]).float().pow(2).sum(-1) for x in signals])
            med = sq.median().item()
            c.sum += alpha * c.tokens * med * P
            return c

        _sl._Slicer._covariance = _cov
    if "varnorm" in v:
        from hf_slicegpt import slicing as _sl

        _orig_ds = _sl._Slicer._dense_statistics

        def _ds(self, keep_spectra, keep_sum, _o=_orig_ds):
            pca.Covariance.add = norm_add
            try:
                return _o(self, keep_spectra, keep_sum)
            finally:
                pca.Covariance.add = orig_add

        _sl._Slicer._dense_statistics = _ds
    if "variance" in v:
        kw["schedule"] = "variance"
    from hf_slicegpt import slicing as _sl2

    _sl2.SHARED_MID_TOLERANCE = float("inf") if "tolinf" in v else 2.0
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
    pca.Covariance.add = orig_add
