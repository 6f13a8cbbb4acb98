#!/usr/bin/env bash
# `make gpu-check`: the last step on the lent GPU machine, after receive.sh got every part
# (docs/gpu-check.md). Reassembles and verifies the wheels, installs them with --target, prints the
# versions and the device, runs `pytest -m gpu`, benchmarks/bench_eval.py and benchmarks/bench_gpu.py, each
# under `timeout`, the whole within GPU_CHECK_BUDGET_S (480 s). Logs and results go to $OUT (else runs/gpu_check):
# gpu_check.log, pytest_gpu.log, bench_eval.json, bench_gpu.log, summary.json, plus what bench_gpu.py writes (8 files).
#
# Knobs (environment): GPU_CHECK_WITHOUT=dali (skip a wheel group), GPU_CHECK_NO_WHEELS=1 (use what
# is installed), GPU_CHECK_BUDGET_S, GPU_CHECK_{INSTALL,PROBE,TEST,BENCH}_S, GPU_CHECK_PYTEST_ARGS,
# GPU_CHECK_BENCH, GPU_CHECK_BENCH_ARGS, GPU_CHECK_BENCH_EVAL, GPU_CHECK_BENCH_EVAL_ARGS, GPU_CHECK_BENCH_EVAL_S,
# GPU_CHECK_IMPORTS, GPU_CHECK_PYTHON, LOWQ_GPU_STAGE, LOWQ_GPU_SITE.
# GPU_CHECK_ALLOW_CPU=1 only for the CPU rehearsal in tests/test_gpu_check.py.
set -uo pipefail

if [ -z "${GPU_CHECK_ALLOW_CPU:-}" ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "gpu-check: no CUDA GPU here (nvidia-smi missing or failing); it runs only on the lent GPU machine, see docs/gpu-check.md" >&2
  exit 2
fi

cd "$(dirname "$0")/../.." || exit 2
PY=${GPU_CHECK_PYTHON:-python3}
OUTDIR=${OUT:-runs/gpu_check}
STAGE=${LOWQ_GPU_STAGE:-/tmp/lowq_gpu_stage}
SITE=${LOWQ_GPU_SITE:-/tmp/lowq_site}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
RESERVE=10    # seconds kept for the summary
KILL_GRACE=10 # a step still running KILL_GRACE s after its TERM is killed
BENCH=${GPU_CHECK_BENCH:-benchmarks/bench_gpu.py}
BENCH_EVAL=${GPU_CHECK_BENCH_EVAL:-benchmarks/bench_eval.py}
export PYTHONUNBUFFERED=1
# the shared LFW faces carried by the last call (tests/conftest.py reads $LOWQ_SHARED/data)
[ -d .gpu_stage/shared/data ] && export LOWQ_SHARED=${LOWQ_SHARED:-$PWD/.gpu_stage/shared}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/lowq_torch_extensions}
mkdir -p "$OUTDIR" || exit 2
WORK=$(mktemp -d)
STEPS=$WORK/steps.tsv
: >"$STEPS"

# step NAME MAX_S [LOGFILE] -- CMD...: run CMD under timeout min(MAX_S, time left), record rc and seconds.
step() {
  local name=$1 max=$2 log=/dev/null
  shift 2
  if [ "$1" != "--" ]; then log=$1; shift; fi
  shift
  local left=$((DEADLINE - SECONDS - RESERVE - KILL_GRACE))
  local t=$((max < left ? max : left))
  if [ "$left" -lt 5 ]; then
    echo "== $name: skipped, the ${BUDGET} s budget is spent"
    printf '%s\t-\t0\t0\n' "$name" >>"$STEPS"
    return 0
  fi
  echo "== $name (timeout ${t} s): $*"
  local t0=$SECONDS rc
  timeout -k "$KILL_GRACE" "$t" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "== $name: TIMED OUT after ${t} s"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$t" >>"$STEPS"
  return "$rc"
}

main() {
  DEADLINE=$((SECONDS + BUDGET))
  echo "gpu-check: $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET} s, output in $OUTDIR"
  command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi
  if [ -z "${GPU_CHECK_NO_WHEELS:-}" ]; then
    if ! step install "${GPU_CHECK_INSTALL_S:-120}" -- \
      "$PY" scripts/gpu_check/device.py install --stage "$STAGE" --target "$SITE" --without "${GPU_CHECK_WITHOUT:-}"; then
      echo "gpu-check: stopping: the wheels are not in place (see the line above)"
      return
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$SITE/bin:$PATH
  fi
  local cpu=()
  [ -n "${GPU_CHECK_ALLOW_CPU:-}" ] && cpu=(--allow-cpu)
  step probe "${GPU_CHECK_PROBE_S:-90}" -- "$PY" scripts/gpu_check/device.py probe --out "$WORK/env.json" \
    --stage "$STAGE" --without "${GPU_CHECK_WITHOUT:-}" --imports "${GPU_CHECK_IMPORTS:-}" "${cpu[@]}"
  # A test module that fails to import elsewhere must not stop the gpu tests: go on past it.
  # shellcheck disable=SC2086  # word splitting of the pytest arguments is wanted
  step tests "${GPU_CHECK_TEST_S:-240}" "$OUTDIR/pytest_gpu.log" -- "$PY" -m pytest \
    ${GPU_CHECK_PYTEST_ARGS:--m gpu -q --continue-on-collection-errors}
  if [ -f "$BENCH_EVAL" ]; then
    # Issue 12 item 8: the evaluation path's images/s against a plain loop, iresnet50 at 112 px (~30 s).
    # Its printout goes to gpu_check.log only: $OUT brings back 8 files, and bench_gpu.py writes 3 of them.
    # shellcheck disable=SC2086
    step bench_eval "${GPU_CHECK_BENCH_EVAL_S:-90}" -- "$PY" "$BENCH_EVAL" \
      --json "$OUTDIR/bench_eval.json" ${GPU_CHECK_BENCH_EVAL_ARGS:---depth 50 --width 1 --batch 256 --images 2000 --repeats 3}
  else
    echo "== bench_eval: $BENCH_EVAL not found, skipped"
  fi
  if [ -f "$BENCH" ]; then
    # The bench gets what the budget has left (at most GPU_CHECK_BENCH_S); GPU_CHECK_BENCH_ARGS trims it.
    # Default: 3 blocks, no torch.compile lever (its two builds took 145 of 300 s on the H100, 2026-11-27,
    # and were measured then: BENCHMARKS.md); the rest fits in ~170 s after the tests.
    # shellcheck disable=SC2086
    step bench "${GPU_CHECK_BENCH_S:-420}" "$OUTDIR/bench_gpu.log" -- "$PY" "$BENCH" --out "$OUTDIR" ${GPU_CHECK_BENCH_ARGS:---repeats 3 --warmup 3 --no-compile}
  else
    echo "== bench: $BENCH not found, skipped"
  fi
}

T0=$SECONDS
main 2>&1 | tee "$OUTDIR/gpu_check.log"
"$PY" scripts/gpu_check/device.py summary --steps "$STEPS" --env "$WORK/env.json" --out-dir "$OUTDIR" \
  --total-s $((SECONDS - T0)) 2>&1 | tee -a "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
