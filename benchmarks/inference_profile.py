"""torch.profiler table of one prefill of a sliced checkpoint, plain path then fused path (same process).

OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference_profile.py SLICED_DIR 4 512
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

import hf_slicegpt  # noqa: F401  (registers the sliced classes)


def main() -> None:
    torch.set_num_threads(1)
    path, batch, seq_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)
    )
    modes = (
        [("plain", False), ("fused", True)] if hasattr(model, "set_fused_inference") else [("native", None)]
    )
    for name, fused in modes:
        if fused is not None:
            model.set_fused_inference(fused)
        with torch.no_grad():
            model(input_ids=ids[:, :64], use_cache=True, logits_to_keep=1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                seconds = time.perf_counter() - start
        print(f"=== {name} {batch}x{seq_len}: {seconds:.2f}s")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
