import torch

from hf_slicegpt.workflows.data import calibration_tokens
from hf_slicegpt.workflows.loading import load_model_and_tokenizer

torch.set_num_threads(1)

m, tok = load_model_and_tokenizer("smollm2", dtype="float32")
ids = calibration_tokens(tok, "pydocs", num_samples=4, seq_len=256, seed=0)
with torch.no_grad():
    out = m(ids, output_hidden_states=True)
for i, h in enumerate(out.hidden_states):
    n = h.norm(dim=-1)  # (4, 256)
    sq = (h**2).sum(-1).flatten()
    share = sq.topk(4).values.sum() / sq.sum()
    print(
        i,
        f"median {n.median():.1f} max {n.max():.1f} pos0 {n[:, 0].mean():.1f} top4-share-of-energy {share:.3f}",
    )
