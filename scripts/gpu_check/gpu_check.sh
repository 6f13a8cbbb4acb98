#!/usr/bin/env bash
# `make gpu-check`: the work on the lent GPU machine, one phase per device call (docs/gpu-check.md):
#   GPU_CHECK_PHASE=core  call 1 (≤ 25 MiB: no DALI): install the core wheels, probe, python -m benchmarks.bench_gpu
#                         --plan gpu-check (r100 trainer/bare at b128 and b256 with a profile, the levers at r100 b256,
#                         SCAN, the classifier's TF32 row), then the bf16/fp16 training tests. Budget 360 s.
#   GPU_CHECK_PHASE=more  a call that brings a DALI part also does one queued task (bench_eval, the other GPU tests).
#   GPU_CHECK_PHASE=dali  the last call: install DALI, its tests, bench_gpu.py --plan dali (threads × prefetch ×
#                         hw_decoder_load, the trainer fed by DALI). Budget 300 s.
# Every step runs under `timeout`, clamped to what is left of the phase's budget; results are written after each
# step into $OUT (else runs/gpu_check), and a table of ≤ 40 lines is printed last (device.py summary).
#
# Knobs (environment): GPU_CHECK_PHASE, GPU_CHECK_WITHOUT=dali (skip a wheel group), GPU_CHECK_NO_WHEELS=1 (use what
# is installed), GPU_CHECK_BUDGET_S, GPU_CHECK_{INSTALL,PROBE,TEST,BENCH}_S, GPU_CHECK_PYTEST_ARGS,
# GPU_CHECK_MORE_PYTEST_ARGS, GPU_CHECK_DALI_PYTEST_ARGS, GPU_CHECK_BENCH, GPU_CHECK_BENCH_ARGS,
# GPU_CHECK_DALI_BENCH_ARGS, GPU_CHECK_BENCH_EVAL, GPU_CHECK_BENCH_EVAL_ARGS, GPU_CHECK_BENCH_EVAL_S,
# GPU_CHECK_IMPORTS, GPU_CHECK_PYTHON, LOWQ_GPU_STAGE, LOWQ_GPU_SITE.
# GPU_CHECK_ALLOW_CPU=1 only for the CPU rehearsal in tests/integration/test_gpu_check.py.
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
PHASE=${GPU_CHECK_PHASE:-core} # core (call 1) | more (a call bringing a DALI part) | dali (the last call)
case "$PHASE" in
  core) BUDGET=${GPU_CHECK_BUDGET_S:-360} ;;
  more) BUDGET=${GPU_CHECK_BUDGET_S:-100} ;;
  dali) BUDGET=${GPU_CHECK_BUDGET_S:-300} ;;
  *)
    echo "gpu-check: GPU_CHECK_PHASE=$PHASE: unknown (core, more, dali)" >&2
    exit 2
    ;;
esac
RESERVE=10    # seconds kept for the summary
KILL_GRACE=10 # a step still running KILL_GRACE s after its TERM is killed
BENCH=${GPU_CHECK_BENCH:-benchmarks/bench_gpu.py}
BENCH_EVAL=${GPU_CHECK_BENCH_EVAL:-benchmarks/bench_eval.py}
export PYTHONUNBUFFERED=1
# the shared LFW faces carried by call 1 (tests/conftest.py reads $LOWQ_SHARED/data), kept in $STAGE for the
# later calls of the same warm machine
if [ -d .gpu_stage/shared/data ]; then
  mkdir -p "$STAGE" && rm -rf "$STAGE/shared" && cp -r .gpu_stage/shared "$STAGE/shared"
fi
[ -d "$STAGE/shared/data" ] && export LOWQ_SHARED=${LOWQ_SHARED:-$STAGE/shared}
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

# The work of each phase, most important first (docs/gpu-check.md): a time limit cuts the tail, never the head.
# a repository benchmark runs as a module (python -m benchmarks.NAME); another path (a test's stand-in) as a file
script_args() { case "$1" in benchmarks/*.py) local m=${1%.py}; echo "-m ${m//\//.}" ;; *) echo "$1" ;; esac; }

bench_step() { # bench_step NAME MAX_S ARGS...: python -m benchmarks.bench_gpu, results into $OUTDIR after every part
  local name=$1 max=$2
  shift 2
  if [ -f "$BENCH" ]; then
    # shellcheck disable=SC2046
    step "$name" "$max" "$OUTDIR/bench_gpu.log" -- "$PY" $(script_args "$BENCH") --out "$OUTDIR" "$@"
  else
    echo "== $name: $BENCH not found, skipped"
  fi
}

phase_core() { # call 1, no DALI: the figures of issue 21, then the mixed-precision training tests
  # shellcheck disable=SC2086  # word splitting of the arguments is wanted
  bench_step bench "${GPU_CHECK_BENCH_S:-240}" ${GPU_CHECK_BENCH_ARGS:---plan gpu-check}
  # shellcheck disable=SC2086
  step tests "${GPU_CHECK_TEST_S:-90}" "$OUTDIR/pytest_gpu.log" -- "$PY" -m pytest \
    ${GPU_CHECK_PYTEST_ARGS:--m gpu -q --continue-on-collection-errors -k "precision or bf16 or fp16"}
  # what the calls that bring DALI's parts do besides receiving, in this order
  printf '%s\n' bench_eval tests_rest bench_again classifier_rates >"$STAGE/more_todo"
}

phase_more() { # a call that brings a DALI part: one queued task that fits its budget
  local task
  task=$(head -1 "$STAGE/more_todo" 2>/dev/null || true)
  [ -n "$task" ] && sed -i 1d "$STAGE/more_todo"
  case "$task" in
    bench_eval)
      # shellcheck disable=SC2086
      [ -f "$BENCH_EVAL" ] && step bench_eval "${GPU_CHECK_BENCH_EVAL_S:-90}" -- "$PY" $(script_args "$BENCH_EVAL") \
        --json "$OUTDIR/bench_eval.json" ${GPU_CHECK_BENCH_EVAL_ARGS:---depth 50 --width 1 --batch 256 --images 2000 --repeats 3}
      ;;
    tests_rest)
      # shellcheck disable=SC2086
      step tests_rest "${GPU_CHECK_TEST_S:-90}" "$OUTDIR/pytest_gpu.log" -- "$PY" -m pytest \
        ${GPU_CHECK_MORE_PYTEST_ARGS:--m gpu -q --continue-on-collection-errors -k "not precision and not bf16 and not fp16 and not dali"}
      ;;
    bench_again) # the key figures once more, from another call: their spread between calls
      bench_step bench_again "${GPU_CHECK_BENCH_S:-90}" --plan gpu-check --parts train
      ;;
    classifier_rates) # the classifier at 1M classes, r = 1.0 and 0.1 (call 1 measures r = 1.0 only)
      bench_step classifier_rates "${GPU_CHECK_BENCH_S:-90}" --parts classifier
      ;;
    "") echo "== more: nothing queued (call 1 queues it)" ;;
  esac
}

phase_dali() { # the last call: DALI's tests, its knobs swept, the trainer fed by DALI
  # shellcheck disable=SC2086
  step tests_dali "${GPU_CHECK_TEST_S:-90}" "$OUTDIR/pytest_gpu.log" -- "$PY" -m pytest \
    ${GPU_CHECK_DALI_PYTEST_ARGS:--m gpu -q --continue-on-collection-errors -k dali}
  # shellcheck disable=SC2086
  bench_step bench_dali "${GPU_CHECK_BENCH_S:-240}" ${GPU_CHECK_DALI_BENCH_ARGS:---plan dali}
}

main() {
  DEADLINE=$((SECONDS + BUDGET))
  echo "gpu-check: $(date -u +%FT%TZ) on $(hostname), phase $PHASE, budget ${BUDGET} s, output in $OUTDIR"
  command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi -L
  mkdir -p "$STAGE"
  local without=${GPU_CHECK_WITHOUT-}
  [ "$PHASE" = core ] && without=${GPU_CHECK_WITHOUT-dali}
  if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && [ "$PHASE" != more ]; then
    if ! step install "${GPU_CHECK_INSTALL_S:-120}" -- \
      "$PY" scripts/gpu_check/device.py install --stage "$STAGE" --target "$SITE" --without "$without"; then
      echo "gpu-check: stopping: the wheels are not in place (see the line above)"
      return
    fi
  fi
  if [ -z "${GPU_CHECK_NO_WHEELS:-}" ]; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$SITE/bin:$PATH
  fi
  if [ "$PHASE" != more ]; then
    local cpu=()
    [ -n "${GPU_CHECK_ALLOW_CPU:-}" ] && cpu=(--allow-cpu)
    step probe "${GPU_CHECK_PROBE_S:-90}" -- "$PY" scripts/gpu_check/device.py probe --out "$WORK/env.json" \
      --stage "$STAGE" --without "$without" --imports "${GPU_CHECK_IMPORTS:-}" "${cpu[@]}"
  fi
  "phase_$PHASE"
}

T0=$SECONDS
main 2>&1 | tee "$OUTDIR/gpu_check.log"
"$PY" scripts/gpu_check/device.py summary --steps "$STEPS" --env "$WORK/env.json" --out-dir "$OUTDIR" \
  --phase "$PHASE" --total-s $((SECONDS - T0)) 2>&1 | tee -a "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
