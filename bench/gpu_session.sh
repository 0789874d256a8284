#!/usr/bin/env bash
# One short GPU session for the figures that need a GPU (docs/RESULTS.md, "GPU"): ML-1M training
# runs in parallel on one GPU, each stopped by a time budget or early stopping, then our Mamba
# layer against mamba_ssm's kernel. Run from the repository root:
#
#   OUT=runs/gpu MLSA4REC_CACHE=DIR MAMBA_SDIST=DIR START_CHECKPOINT=FILE bench/gpu_session.sh
#
# MLSA4REC_CACHE holds the two MovieLens wheels (the GPU machine has no network),
# MAMBA_SDIST an unpacked mamba_ssm sdist (its kernel is built here, for this GPU only),
# START_CHECKPOINT the CPU-trained ML-1M MLSA4Rec-S checkpoint that one run continues.
# Every run is first tried for one epoch on ML-100k (SMOKE_ARGS) so that a broken run costs
# seconds, not the session.
set -u
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
BUDGET_MIN=${BUDGET_MIN:-5}
SMOKE_ARGS=${SMOKE_ARGS:---dataset ml-100k --epochs 1}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }

# name | training options (ML-1M). "recbole": RecBole's samples, one per target with up to 50
# items before it (window stride 1 for causal models), batch 2048 as RecBole's default;
# "len200": windows of 200 side by side, loss at every position, as Mamba4Rec's paper on ML-1M.
JOBS=(
  "sasrec-recbole|--model sasrec --window-stride 1 --batch-size 2048"
  "mlsa4rec-recbole|--model mlsa4rec --batch-size 2048"
  "mlsa4rec-s-recbole-continued|--model mlsa4rec-s --window-stride 1 --batch-size 2048 --init-from ${START_CHECKPOINT:-}"
  "mlsa4rec-s-len200|--model mlsa4rec-s --max-len 200 --batch-size 64"
  "mamba4rec-len200|--model mamba4rec --max-len 200 --batch-size 64"
  "sasrec-len200|--model sasrec --max-len 200 --batch-size 64"
)

log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
log "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

# Several small launch-bound jobs share the GPU far better through MPS than by time slicing.
if command -v nvidia-cuda-mps-control >/dev/null && [ "${USE_MPS:-1}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c "import torch; torch.ones(1, device='cuda')"; then
    log "MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    log "MPS off (did not start)"
  fi
fi

# The kernel build runs on the CPUs while the GPU trains.
if [ -n "${MAMBA_SDIST:-}" ]; then
  MAX_JOBS=8 "$PY" bench/gpu_build_mamba_kernels.py "$MAMBA_SDIST" /tmp/ssm-build \
    >"$OUT/kernel-build.log" 2>&1 &
  BUILD_PID=$!
fi

run_jobs() {   # run_jobs PHASE TIMEOUT_S EXTRA_ARGS...: every job at once; 0 if all passed
  local phase=$1 limit=$2; shift 2
  local pids=() names=() failed=0
  for job in "${JOBS[@]}"; do
    local name=${job%%|*} args=${job#*|}
    if [ "$phase" = smoke ]; then args=${args%--init-from*}; fi
    # shellcheck disable=SC2086
    timeout "$limit" "$PY" cli.py train $args "$@" --threads 1 --progress false \
      --checkpoint "$RUNS/$phase-$name.pt" >"$RUNS/$phase-$name.log" 2>&1 &
    pids+=($!); names+=("$name")
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      failed=1; log "$phase ${names[$i]} FAILED:"; tail -n 15 "$RUNS/$phase-${names[$i]}.log"
    fi
  done
  return $failed
}

log "smoke: every run for one epoch ($SMOKE_ARGS)"
# shellcheck disable=SC2086
if ! run_jobs smoke 240 $SMOKE_ARGS; then
  log "smoke failed: stopping before the long runs"
  [ -n "${BUILD_PID:-}" ] && kill "$BUILD_PID" 2>/dev/null
  tar czf "$OUT/gpu-runs.tgz" -C "$RUNS" . && rm -rf "$RUNS"
  exit 1
fi
[ "${SMOKE_ONLY:-0}" = 1 ] && { log "smoke passed"; exit 0; }
log "ML-1M runs, time budget $BUDGET_MIN min each"
run_jobs ml1m $(( ${BUDGET_MIN%.*} * 60 + 150 )) --dataset ml-1m --time-budget-min "$BUDGET_MIN"
for job in "${JOBS[@]}"; do
  name=${job%%|*}
  echo "== $name"; grep -E "training sequences|best epoch|^ *(valid|test)|stop" "$RUNS/ml1m-$name.log"
done

tar czf "$OUT/gpu-runs.tgz" -C "$RUNS" . && rm -rf "$RUNS"   # at most 8 files come back

if [ -n "${BUILD_PID:-}" ]; then
  if wait "$BUILD_PID"; then
    log "$(tail -n 1 "$OUT/kernel-build.log")"
    PYTHONPATH="/tmp/ssm-build:$MAMBA_SDIST" timeout 120 "$PY" bench/gpu_mamba_check.py 2>&1 \
      | tee "$OUT/mamba-check.log"
  else
    log "kernel build FAILED"; tail -n 30 "$OUT/kernel-build.log"
  fi
fi
[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control
log done
