#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (issue 18) in one run on a lent device machine, bf16:
#   1. prefill at batch 1, 8 and 64 (x 512), every plugin model as loaded (fused_inference="auto": plain GEMMs
#      on views of the fused matrix, eagerly), forced fused (NAME:fused) and forced plain (NAME:plain);
#   2. a per-op profile (GPU time and the CPU time that launched it) at 64 x 512 and 1 x 512;
#   3. batch-1 decode with a static cache, torch.compile and CUDA graphs, then the peak CUDA memory.
#
# The device machine has its own Python and torch and takes 64 MiB of files, so two ignored folders travel with
# the repository; `make gpu-bundle` makes them here (see BENCHMARKS.md, "Performance on a GPU"):
#   .whl/          the pinned transformers, huggingface_hub, tokenizers, peft, datasets (+ their new deps) as wheels
#   .gpu/smollm2/  SmolLM2-135M's config and tokenizer; the weights are drawn at random (--random-weights):
#                  the 98 MB GGUF cannot travel, and a forward's time depends on shapes and dtype, not values
# Results: $OUT (the device tool's folder) or benchmarks/results.
set -euo pipefail
out=${OUT:-benchmarks/results}
work=/tmp/gpu-inference
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, transformers, hf_slicegpt; print('torch', torch.__version__, 'transformers', transformers.__version__)"
log="$out/inference_speed_gpu.log"
mkdir -p "$out" && : >"$log" && : >"$out/inference_profile_gpu.md"
rm -rf "$work" && mkdir -p "$work"

python3 benchmarks/inference_speed.py --device cuda --dense .gpu/smollm2 --random-weights --workdir "$work" \
    --modes layer global native --sparsities 0.25 --shapes 1x512 8x512 64x512 --repeats 15 --with-plain --with-fused \
    --no-decode --no-memory --json "$out/inference_speed_gpu_prefill.json" 2>&1 | tee -a "$log"

w=$(ls -d "$work"/inference-speed-* | head -1)  # the first run's checkpoints
models=(dense="$w/dense" layer-25%:fused="$w/layer-0.25" layer-25%:plain="$w/layer-0.25" layer-25%="$w/layer-0.25"
    global-25%="$w/global-0.25" native-25%="$w/native-0.25")
for shape in 64x512 1x512; do
    python3 benchmarks/inference_profile.py "${models[@]}" --device cuda --shape "$shape" --rounds 5 --rows 12 \
        2>>"$log" | tee -a "$out/inference_profile_gpu.md"
done

python3 benchmarks/inference_speed.py --device cuda --dense "$w/dense" --shapes 1x512 --repeats 15 --no-prefill \
    --checkpoints "$w/layer-0.25" "$w/global-0.25" native-25%="$w/native-0.25" --prompt-len 128 \
    --decode-tokens 64 --compile-options triton.cudagraphs=True --json "$out/inference_speed_gpu_decode.json" \
    2>&1 | tee -a "$log"
