import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robustness import ood_sources

import hf_slicegpt
from hf_slicegpt.workflows.data import calibration_tokens, evaluation_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

torch.set_num_threads(1)
workdir = Path(tempfile.mkdtemp())
dense, tok = load_model_and_tokenizer("smollm2", dtype="float32")
calib = calibration_tokens(tok, "pydocs", num_samples=32, seq_len=512, seed=0)
ids = evaluation_tokens(tok, ood_sources(workdir)["licenses"], seq_len=512, max_tokens=2048, split="all")


def nll(m):
    with torch.no_grad():
        out = []
        for i in range(0, ids.shape[0], 2):
            x = ids[i : i + 2]
            logits = m(x).logits[:, :-1].float()
            out.append(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
                ).view(x.shape[0], -1)
            )
        return torch.cat(out)


d = nll(dense)
m, _ = load_model_and_tokenizer("smollm2", dtype="float32")
s = hf_slicegpt.slice_model(m, calib, 0.25, show_progress=False)
sl = nll(s)
delta = sl - d
tgt = ids[:, 1:]
print("mean nll dense", d.mean().item(), "sliced", sl.mean().item())
agg = collections.defaultdict(lambda: [0, 0.0])
for t, dl in zip(tgt.flatten().tolist(), delta.flatten().tolist()):
    agg[t][0] += 1
    agg[t][1] += dl
tot = delta.sum().item()
rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]
for t, (c, s_) in rows:
    print(repr(tok.decode([t])), c, f"{s_:.1f}", f"{s_ / tot:.1%}")
# by previous-token being whitespace/newline
prev = ids[:, :-1].flatten().tolist()
ws = [i for i, p in enumerate(prev) if tok.decode([p]).strip() == ""]
print(
    "share of damage on tokens following whitespace-only tokens:",
    delta.flatten()[ws].sum().item() / tot,
    len(ws) / len(prev),
)
tw = [i for i, t in enumerate(tgt.flatten().tolist()) if tok.decode([t]).strip() == ""]
print(
    "share of damage predicting whitespace-only tokens:",
    delta.flatten()[tw].sum().item() / tot,
    len(tw) / len(prev),
)
pos = delta.mean(0)
print("damage by position bucket:", [round(pos[i : i + 64].mean().item(), 2) for i in range(0, 511, 64)])
