"""llama.cpp generates from the GGUF export of a sliced SmolLM2: greedy tokens must equal transformers'.

llama.cpp runs through ``llama-cpp-python`` (it compiles llama.cpp, so it lives in its own venv, never in
``make install``); this script drives it in a subprocess with that venv's interpreter, so the project venv needs
nothing new. Steps: slice SmolLM2-135M with ``rotation="global"`` (or take ``--native DIR``), export GGUF files
(f32, f16, q8_0), then for a held-out pydocs prompt compare 32 greedy tokens:

- f32: llama.cpp on the GGUF against transformers on the native checkpoint (must be equal: exit status 1 if not);
- f16, q8_0: llama.cpp against transformers reading the same GGUF (reported: quantised kernels round
  differently, so a near tie may flip).

    make llamacpp-check        # builds .venv-llamacpp once (minutes), then runs this script
    LLAMACPP_PYTHON=.venv-llamacpp/bin/python .venv/bin/python benchmarks/llamacpp_check.py

With ``--llama-side`` the script is the llama.cpp half (stdlib + llama_cpp only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 32


def llama_side(request: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding in llama.cpp from token ids (no sampling code involved: argmax of the logits)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=request["gguf"],
        n_ctx=512,
        n_batch=512,
        n_threads=request.get("threads", 1),
        logits_all=True,  # llama-cpp-python 0.3.36 keeps logits in `scores` only then
        verbose=False,
    )
    prompt = list(request["prompt_ids"])
    llm.reset()
    llm.eval(prompt)
    tokens, margins = [], []
    for _ in range(request["new_tokens"]):
        scores = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        top2 = np.sort(scores)[-2:]
        token = int(np.argmax(scores))
        tokens.append(token)
        margins.append(float(top2[1] - top2[0]))
        llm.eval([token])
    tokenized = llm.tokenize(request["prompt_text"].encode("utf-8"), add_bos=False, special=False)
    return {"tokens": tokens, "margins": margins, "tokenized": list(tokenized)}


def find_llama_python(explicit: str | None) -> str | None:
    """An interpreter that can import llama_cpp: --llama-python, $LLAMACPP_PYTHON, this one, or .venv-llamacpp."""
    candidates = [explicit, os.environ.get("LLAMACPP_PYTHON")]
    if importlib.util.find_spec("llama_cpp") is not None:
        candidates.append(sys.executable)
    candidates += [str(REPO / ".venv-llamacpp" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import llama_cpp"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


def run_llama(python: str, request: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [python, __file__, "--llama-side"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp side failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_native(directory: Path, sparsity: float, num_samples: int, seq_len: int) -> None:
    import hf_slicegpt
    from hf_slicegpt.checkpoint.export import save_native
    from hf_slicegpt.workflows.data import calibration_tokens
    from hf_slicegpt.workflows.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32")
    calibration = calibration_tokens(tokenizer, "pydocs", num_samples=num_samples, seq_len=seq_len, seed=42)
    sliced = hf_slicegpt.slice_model(model, calibration, sparsity, rotation="global", show_progress=False)
    save_native(sliced, directory, tokenizer=tokenizer, overwrite=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--native", default=None, help="a native export dir (default: slice SmolLM2 now)")
    parser.add_argument("--work-dir", default="benchmarks/results/llamacpp-work")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-python", default=None, help="an interpreter that can import llama_cpp")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.llama_side:
        print(json.dumps(llama_side(json.loads(sys.stdin.read()))))
        return 0

    python = find_llama_python(args.llama_python)
    if python is None:
        print("llama_cpp is not importable: build it with `make llamacpp-check` or set LLAMACPP_PYTHON")
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_slicegpt.checkpoint.gguf_export import export_gguf
    from hf_slicegpt.workflows.data import load_text

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    native_dir = Path(args.native) if args.native else work / f"native-{args.sparsity:g}"
    if not (native_dir / "config.json").exists():
        build_native(native_dir, args.sparsity, args.num_samples, args.seq_len)
    tokenizer = AutoTokenizer.from_pretrained(native_dir)
    native = AutoModelForCausalLM.from_pretrained(native_dir, dtype=torch.float32).eval()
    text = load_text("pydocs", purpose="evaluation")[:2000]  # held out: calibration never saw it
    prompt_ids = tokenizer(text).input_ids[:64]
    prompt_text = tokenizer.decode(prompt_ids)

    def greedy(model: torch.nn.Module) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                eos_token_id=None,
            )
        return out[0, len(prompt_ids) :].tolist()

    reference = greedy(native)
    results: dict[str, Any] = {
        "native": str(native_dir),
        "hidden_size": native.config.hidden_size,
        "rows": [],
    }
    ok = True
    for dtype in args.dtypes:
        path = export_gguf(native_dir, work / f"smollm2-sliced-{dtype}.gguf", dtype=dtype, overwrite=True)
        from_gguf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        transformers_tokens = reference if dtype == "f32" else greedy(from_gguf.eval())
        llama = run_llama(
            python,
            {
                "gguf": str(path.resolve()),
                "prompt_ids": prompt_ids,
                "prompt_text": prompt_text,
                "new_tokens": NEW_TOKENS,
                "threads": args.threads,
            },
        )
        agree = 0
        for a, b in zip(llama["tokens"], transformers_tokens):
            if a != b:
                break
            agree += 1
        row = {
            "dtype": dtype,
            "bytes": path.stat().st_size,
            "agree": agree,
            "llama_cpp": llama["tokens"],
            "transformers": transformers_tokens,
            "min_margin": min(llama["margins"]),
            "same_tokenization": llama["tokenized"] == prompt_ids,
        }
        results["rows"].append(row)
        if dtype == "f32" and agree < NEW_TOKENS:
            ok = False
        print(
            f"{dtype:>5}: {path.stat().st_size / 1e6:.1f} MB, llama.cpp == transformers for {agree}/{NEW_TOKENS} "
            f"greedy tokens (smallest top-2 logit margin {row['min_margin']:.3f}); llama.cpp tokenizes the prompt "
            f"{'identically' if row['same_tokenization'] else 'differently'}"
        )
    print("llama.cpp continuation (f32):", repr(tokenizer.decode(results["rows"][0]["llama_cpp"])))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
