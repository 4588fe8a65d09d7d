"""#8 diagnostics: depth-tapered widths. Each spec is ``emb,a,b,c,head[,ma,mb,mc]``.

``a``/``b``/``c`` are the block output widths of blocks 0-9, 10-19 and 20-28 (block 29's output is ``head``);
``ma``/``mb``/``mc`` the mid (attention output) widths of the same thirds, defaulting to ``a``/``b``/``c``.
SmolLM2 only (30 blocks). Prints parameters and perplexity relative to dense for each spec.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fresh_model, setup

import hf_slicegpt
from hf_slicegpt import slicing

env = setup()


def thirds(i, a, b, c):
    return a if i < 10 else b if i < 20 else c


for spec in sys.argv[1:]:
    v = [int(x) for x in spec.split(",")]
    emb, a, b, c, head = v[:5]
    ma, mb, mc = v[5:8] if len(v) > 5 else (a, b, c)

    def plan(p, emb=emb, a=a, b=b, c=c, head=head, ma=ma, mb=mb, mc=mc):
        n = len(p.outputs)
        p.embedding = emb
        p.outputs = [thirds(i, a, b, c) for i in range(n - 1)] + [head]
        p.mids = [thirds(i, ma, mb, mc) for i in range(n)]
        return p

    hooks = slicing.SlicingHooks(plan=plan)
    sliced = hf_slicegpt.slice_model(fresh_model(), env.calibration, 0.25, show_progress=False, hooks=hooks)
    print(spec, sum(p.numel() for p in sliced.parameters()), env.relative(sliced), flush=True)
