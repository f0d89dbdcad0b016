#!/usr/bin/env bash
# One-shot GPU check (one H100: about 5-6 minutes expected, cut at BUDGET_S = 510 s), in one call:
#   a. environment: torch / CUDA / device, detectron2 and qeeps_d2 imports;
#   b. issue #5 item 8: a short CUDA training + evaluation of the R-50 configs on SynthPS
#      (generated first): OIM R-50 (configs/CUHK-SYSU/oim_R_50_C4.yaml, from scratch), its
#      --eval-only, QEEPS R-50 (qeeps_R_50_C4.yaml) from that OIM checkpoint, its --eval-only as a
#      cascade (K=10). A few iterations only: the metrics are at chance, the mechanics count;
#   c. issue #7: benchmarks/run.py at 900x1500 (OIM and QEEPS, B=1 and 8 per forward) in fp32,
#      TF32 and bf16 autocast.
# Each step runs under `timeout` (and a global deadline, BUDGET_S), a failed step is reported and
# the next one runs anyway; the exit status is the number of failed steps.
#
#   PYTHONPATH=.gpusite:$PWD bash benchmarks/gpu_check.sh          # on the GPU machine
#   nice -n 15 env DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh  # rehearsal on CPU
#
# Environment: OUT (default output/gpu): the log (gpu_check.log), steps.tsv (step, status,
# seconds), bench_<precision>.json and bench_tables.md go there (6 files); DEVICE (cuda | cpu);
# QUICK=1 (2 iterations, short side 240, 2 queries, 20 proposals at test, --sizes synthps);
# DEVICE=cpu: fp32 only, time limits x4; PY (python3);
# ITERS (training iterations, default 20); BUDGET_S (default 510, x4 on CPU: steps stop being
# started, and are cut, at this many seconds after the start). Trained models go to
# output/gpu/{oim,qeeps}_r50. ONLY (a bash regex of step names: env synthps oim_train oim_eval
# qeeps_train qeeps_eval bench_fp32 bench_tf32 bench_bf16) runs only those steps, e.g. for a rerun
# on the warm machine (ONLY='qeeps|bench_bf16').
set -uo pipefail
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
ONLY=${ONLY:-}
OUT=${OUT:-output/gpu}
mkdir -p "$OUT"
rm -f "$OUT/bench_tables.md"
exec > >(tee "$OUT/gpu_check.log") 2>&1
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS"
START=$(date +%s)
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD under timeout (LIMIT_S, clamped to the time left), prints and
# records its status and duration; never stops the script.
step() {
  local name=$1 limit=$2 left t0 rc status
  shift 2
  if [ -n "$ONLY" ] && ! [[ $name =~ $ONLY ]]; then
    echo "=== [$name] not selected (ONLY=$ONLY)"
    return 0
  fi
  limit=$((limit * SCALE))
  left=$((START + BUDGET_S - $(date +%s)))
  if [ "$left" -lt 15 ]; then
    echo "=== [$name] SKIPPED: ${left}s of the ${BUDGET_S}s budget left"
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
    FAILED=$((FAILED + 1))
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$name] start $(date -u +%H:%M:%S) (limit ${limit}s): $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@"
  rc=$?
  local dt
  dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124|137) status="timeout(${limit}s)" ;;
    *) status="failed(rc=$rc)" ;;
  esac
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "=== [$name] $status in ${dt}s"
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STEPS"
  return 0
}

# --- settings per mode ------------------------------------------------------------------------
ITERS=${ITERS:-20}
SCALE=1                                   # multiplies the step time limits
WORKERS=4
INPUT_OPTS=()
EVAL_OPTS=(TEST.PERSON_SEARCH.GALLERY_SIZE 50 TEST.PERSON_SEARCH.BATCH_SIZE 8)
BENCH_SIZES=r50_900
PRECISIONS="fp32 tf32 bf16"
if [ "$QUICK" = 1 ]; then
  ITERS=2
  WORKERS=1
  INPUT_OPTS=(INPUT.MIN_SIZE_TRAIN "(240,)" INPUT.MAX_SIZE_TRAIN 400 INPUT.MIN_SIZE_TEST 240
              INPUT.MAX_SIZE_TEST 400)
  EVAL_OPTS=(TEST.PERSON_SEARCH.GALLERY_SIZE 50 TEST.PERSON_SEARCH.BATCH_SIZE 2
             TEST.PERSON_SEARCH.MAX_QUERIES 2 MODEL.RPN.POST_NMS_TOPK_TEST 20)
  BENCH_SIZES=synthps
fi
if [ "$DEVICE" != cuda ]; then
  PRECISIONS=fp32                         # tf32 / bf16 autocast are CUDA-only in run.py
  SCALE=4
fi
BUDGET_S=${BUDGET_S:-$((510 * SCALE))}
# The R-50 configs on SynthPS: identities from the data set (NUM_PIDS 0 reads DATASETS.TRAIN, in
# evaluation too), no pretrained weights (nothing can be downloaded there), hence trainable
# BatchNorm everywhere: the from-scratch frozen-BN R-50 starts at a loss of 1.6e4 and diverged
# (Inf/NaN boxes) in 2 iterations here.
COMMON_OPTS=(DATASETS.TRAIN '("synthps_train",)' MODEL.QEEPS.OIM.NUM_PIDS 0 MODEL.DEVICE "$DEVICE"
             MODEL.RESNETS.NORM BN MODEL.BACKBONE.FREEZE_AT 0 DATALOADER.NUM_WORKERS "$WORKERS"
             "${INPUT_OPTS[@]}")
# Training: ITERS iterations in the configs' warmup (small learning rate), checkpoint at the
# end; DATASETS.TEST () skips the evaluation after training: the --eval-only steps do it.
DATA_OPTS=("${COMMON_OPTS[@]}" DATASETS.TEST '()' SOLVER.IMS_PER_BATCH 2 SOLVER.EPOCHS 0
           SOLVER.MAX_ITER "$ITERS" SOLVER.CHECKPOINT_PERIOD 100000)
TEST_OPTS=("${COMMON_OPTS[@]}" DATASETS.TEST '("synthps_test",)' "${EVAL_OPTS[@]}")
OIM_DIR=output/gpu/oim_r50
QEEPS_DIR=output/gpu/qeeps_r50
TRAIN=projects/QEEPS/train_net.py
echo "gpu_check: DEVICE=$DEVICE QUICK=$QUICK SCALE=$SCALE ITERS=$ITERS OUT=$OUT" \
     "BUDGET_S=$BUDGET_S ONLY=$ONLY PYTHONPATH=${PYTHONPATH:-} $(date -u +%FT%TZ)"

# --- a. environment ---------------------------------------------------------------------------
step env 60 "$PY" -c "
import sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| cudnn', torch.backends.cudnn.version())
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'no CUDA device'
    props = torch.cuda.get_device_properties(0)
    print('device', props.name, '| capability %d.%d' % (props.major, props.minor),
          '| memory %.1f GiB' % (props.total_memory / 2**30))
import detectron2, fvcore, pycocotools.mask, qeeps_d2, qeeps_d2.modeling
print('detectron2', detectron2.__version__, detectron2.__file__)
print('qeeps_d2', qeeps_d2.__file__)
"

# --- b. R-50 training + evaluation on SynthPS -------------------------------------------------
step synthps 120 "$PY" -m qeeps_d2.data.synthps
[[ oim_train =~ ${ONLY:-.} ]] && rm -rf "$OIM_DIR"
[[ qeeps_train =~ ${ONLY:-.} ]] && rm -rf "$QEEPS_DIR"
step oim_train 120 "$PY" "$TRAIN" --config-file configs/CUHK-SYSU/oim_R_50_C4.yaml \
  "${DATA_OPTS[@]}" MODEL.WEIGHTS '""' OUTPUT_DIR "$OIM_DIR"
step oim_eval 90 "$PY" "$TRAIN" --config-file configs/CUHK-SYSU/oim_R_50_C4.yaml --eval-only \
  "${TEST_OPTS[@]}" MODEL.WEIGHTS "$OIM_DIR/model_final.pth" OUTPUT_DIR "$OIM_DIR"
OIM_WEIGHTS=$OIM_DIR/model_final.pth
if [ ! -f "$OIM_WEIGHTS" ]; then
  echo "gpu_check: no OIM checkpoint; QEEPS starts from scratch"
  OIM_WEIGHTS='""'
fi
step qeeps_train 120 "$PY" "$TRAIN" --config-file configs/CUHK-SYSU/qeeps_R_50_C4.yaml \
  "${DATA_OPTS[@]}" MODEL.WEIGHTS "$OIM_WEIGHTS" OUTPUT_DIR "$QEEPS_DIR"
step qeeps_eval 120 "$PY" "$TRAIN" --config-file configs/CUHK-SYSU/qeeps_R_50_C4.yaml --eval-only \
  "${TEST_OPTS[@]}" TEST.PERSON_SEARCH.CASCADE_TOPK 10 \
  MODEL.WEIGHTS "$QEEPS_DIR/model_final.pth" OUTPUT_DIR "$QEEPS_DIR"

# --- c. speed tables ---------------------------------------------------------------------------
for precision in $PRECISIONS; do
  step "bench_$precision" 120 "$PY" benchmarks/run.py --device "$DEVICE" --sizes $BENCH_SIZES \
    --precision "$precision" --batch 8 --runs 3 --warmup 2 --out "$OUT/bench_${precision}.json"
  if [ -f "$OUT/bench_${precision}.json" ]; then
    { echo "## $precision"; echo; "$PY" benchmarks/run.py --table "$OUT/bench_${precision}.json"
      echo; } >> "$OUT/bench_tables.md" 2>/dev/null
  fi
done

echo "=== gpu_check done in $(($(date +%s) - START))s, $FAILED step(s) failed or skipped:"
column -t "$STEPS" 2>/dev/null || cat "$STEPS"
exit "$FAILED"
