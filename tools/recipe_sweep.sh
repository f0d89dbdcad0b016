#!/usr/bin/env bash
# SynthPS OIM recipe sweep: which data-set knobs and OIM settings let re-identification learn
# within the demo's budget (1000 iterations). Every variant trains configs/SynthPS/oim.yaml with
# its overrides (tools/ablation.py: train + evaluate at gallery 50 and 100), all in parallel:
# meant for a GPU machine (on 2 CPU cores one variant takes ~13 min).
#   bash tools/recipe_sweep.sh                 # DEVICE=cuda, results in output/sweep/
#   DEVICE=cpu QUICK=1 bash tools/recipe_sweep.sh   # 4 iterations each, to check the plumbing
set -uo pipefail
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUTDIR=${SWEEP_DIR:-output/sweep}
LIMIT=${SWEEP_LIMIT_S:-420}
mkdir -p "$OUTDIR"
# data-set variants: name -> qeeps-synthps knobs
declare -A DATA=(
  [d0]=""
  [d1]="--appearances-per-id 4 10 --illumination 0.5"
  [d2]="--appearances-per-id 4 10"
  [d3]="--appearances-per-id 4 10 --illumination 0.25"
  [d4]="--appearances-per-id 4 10 --illumination 0.5 --lookalike-fraction 0.15"
)
# runs: name data overrides (ROUND=1: first sweep, ROUND=2: around its best, r2)
RUNS1=(
  "r0 d0 "
  "r1 d0 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 1.0"
  "r2 d1 "
  "r3 d1 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 1.0"
  "r5 d2 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 1.0"
  "r7 d1 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 1.0 SOLVER.IMS_PER_BATCH 8 SOLVER.BASE_LR 0.002 MODEL.QEEPS.OIM.LOSS_START_ITER 200 MODEL.QEEPS.OIM.LOSS_WARMUP_ITERS 50"
  "r8 d1 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 1.0 SOLVER.EPOCHS 7 SOLVER.EPOCH_STEPS (6,) MODEL.QEEPS.OIM.LOSS_START_ITER 250 MODEL.QEEPS.OIM.LOSS_WARMUP_ITERS 50"
)
RUNS2=(
  "s0 d1 "
  "s1 d1 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 0.2"
  "s2 d1 MODEL.QEEPS.OIM.SCALAR 10.0"
  "s3 d3 "
  "s4 d4 "
  "s5 d1 MODEL.QEEPS.OIM.LOSS_START_ITER 200"
  "s6 d1 MODEL.QEEPS.OIM.TRUNK_GRAD_SCALE 0.2 MODEL.QEEPS.OIM.LOSS_START_ITER 200"
  "s7 d1 MODEL.ROI_HEADS.POSITIVE_FRACTION 0.5"
)
if [ "${ROUND:-1}" = 2 ]; then RUNS=("${RUNS2[@]}"); else RUNS=("${RUNS1[@]}"); fi
QUICK_OPTS=()
if [ "${QUICK:-0}" = 1 ]; then
  QUICK_OPTS=(SOLVER.EPOCHS 0 SOLVER.MAX_ITER 4 SOLVER.STEPS "(3,)" MODEL.QEEPS.OIM.LOSS_START_ITER 1
              MODEL.QEEPS.OIM.LOSS_WARMUP_ITERS 1 SOLVER.WARMUP_ITERS 1)
fi
start=$(date +%s)
USED=$(for run in "${RUNS[@]}"; do read -r _ data _ <<< "$run"; echo "$data"; done | sort -u)
for d in $USED; do
  $PY -m qeeps_d2.data.synthps --root "$OUTDIR/data_$d/synthps" ${DATA[$d]} > "$OUTDIR/data_$d.txt" 2>&1 &
done
wait
echo "data sets ready after $(( $(date +%s) - start )) s"
for run in "${RUNS[@]}"; do
  read -r name data opts <<< "$run"
  # shellcheck disable=SC2086
  DETECTRON2_DATASETS="$OUTDIR/data_$data" timeout "$LIMIT" $PY tools/ablation.py \
    configs/SynthPS/oim.yaml --gallery-sizes 50 100 --out "$OUTDIR/$name.md" --opts \
    OUTPUT_DIR "$OUTDIR/$name" MODEL.DEVICE "$DEVICE" DATALOADER.NUM_WORKERS 1 \
    $opts "${QUICK_OPTS[@]}" > "$OUTDIR/$name.log" 2>&1 &
done
wait
echo "runs done after $(( $(date +%s) - start )) s"
for run in "${RUNS[@]}"; do
  read -r name data opts <<< "$run"
  echo "== $name data=$data (${DATA[$data]:-default}) ${opts:-base recipe}"
  if [ -f "$OUTDIR/$name.md" ]; then tail -n 1 "$OUTDIR/$name.md"; else tail -n 3 "$OUTDIR/$name.log"; fi
done
