#!/usr/bin/env bash
# GPU check of issue #7 (one H100: about 4 minutes): R-50 at 900x1500, OIM and QEEPS, in fp32,
# TF32 and bf16 autocast, pair latency (B=1) and per pair with 8 gallery images per forward.
# Run from the repository root on a machine with CUDA:  bash benchmarks/gpu_check.sh
# Tables are printed and written to output/bench_gpu_<precision>.json.
set -euo pipefail
PY=${PY:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
for precision in fp32 tf32 bf16; do
  $PY benchmarks/run.py --device cuda --sizes r50_900 --precision "$precision" --batch 8 \
    --runs 5 --warmup 3 --out "output/bench_gpu_${precision}.json"
done
