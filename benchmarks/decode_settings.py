"""Batch-1 decode of a model under each inductor setting, to find the fastest on this CPU (one process each).

Inductor's settings are global to a process, so each setting runs in a child process of its own: the model is
loaded, its step compiled (``inference_speed.Decoder``: static cache, greedy), one untimed run warms it, then
``--repeats`` runs of ``--tokens`` tokens after a ``--prompt-len`` prompt are timed. Each compiled setting's
tokens are checked against eager decoding. The settings:

- ``eager``: no compile;
- ``plain``: ``torch.compile`` with inductor's defaults;
- ``freezing``: ``freezing=True`` (weights become prepacked constants of the graph);
- ``autotune``: ``freezing`` plus ``max_autotune`` with the C++ GEMM templates (``CPP,ATEN``), the settings that
  made decode 2.1-2.2x faster on the AMD EPYC VM (docs/performance.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_settings.py --json benchmarks/results/decode_settings_intel.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("decode_settings")
SETTINGS = ("eager", "plain", "freezing", "autotune")


def child(setting: str, model_name: str, prompt_len: int, tokens: int, repeats: int) -> dict:
    """Time one setting in this process (called in a child)."""
    import torch._inductor.config as inductor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import inference_speed as bench

    from hf_slicegpt.workflows.loading import load_model_and_tokenizer

    inductor.freezing = setting in ("freezing", "autotune")
    if setting == "autotune":
        inductor.max_autotune = True
        inductor.max_autotune_gemm_backends = "CPP,ATEN"
    model = load_model_and_tokenizer(model_name, dtype="float32")[0].eval()
    prompt = torch.randint(
        0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    decoder = bench.Decoder(model, prompt_len, tokens, torch.device("cpu"), compile=setting != "eager")
    start = time.perf_counter()
    decoder.run(prompt)  # compiles
    first = time.perf_counter() - start
    rates = sorted(tokens / decoder.run(prompt)[0] for _ in range(repeats))
    agree = tokens if setting == "eager" else decoder.agreement(prompt)
    return {"setting": setting, "tok_s": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "first_run_s": first, "tokens_equal_eager": agree}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.prompt_len, args.tokens, args.repeats)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rows = []
    for setting in args.settings:
        command = [sys.executable, __file__, "--child", setting, "--model", args.model, "--threads", str(args.threads),
                   "--prompt-len", str(args.prompt_len), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        logger.info("%s", rows[-1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    print(
        f"\n{args.model}, batch-1 decode, {args.tokens} tokens after {args.prompt_len}, {args.threads} thread(s), {cpu}"
    )
    print("| setting | tok/s (median) | [min-max] | first run (s, compile included) | tokens equal eager |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['tok_s']:.1f} | [{r['min']:.1f}-{r['max']:.1f}] | {r['first_run_s']:.0f} | "
              f"{r['tokens_equal_eager']}/{args.tokens} |")  # fmt: skip
    if args.json:
        info = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_"))}}  # fmt: skip
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
