#!/usr/bin/env bash
# GPU-machine side, one device call per part (docs/gpu-check.md):
#   bash scripts/gpu_check/receive.sh part_03        (the call carries .gpu_stage/part_03)
# Copies the carried part out of the work tree into $LOWQ_GPU_STAGE (default /tmp/lowq_gpu_stage),
# where it survives the next call while the machine stays warm, and checks its chunks' sha256.
# Prints one line: which parts are here, which are still missing. Errors: one line, exit 3/4.
set -euo pipefail
part=${1:?usage: receive.sh part_NN}
src=${GPU_STAGE_SRC:-.gpu_stage}/$part
dst=${LOWQ_GPU_STAGE:-/tmp/lowq_gpu_stage}
if [ ! -f "$src/$part.sha256" ]; then
  echo "receive: $src/$part.sha256 not here: name .gpu_stage/$part in the call's carry" >&2
  exit 3
fi
mkdir -p "$dst"
cp -f "$src"/* "$dst"/
cd "$dst"
if ! bad=$(sha256sum -c --quiet "$part.sha256" 2>&1); then
  echo "receive: $part corrupt after the transfer ($(echo "$bad" | grep -m1 -v '^sha256sum:' || true)): send it again" >&2
  rm -f "$part.sha256"
  exit 4
fi
n=$(sed -n 's/.*"n_parts": *\([0-9]*\).*/\1/p' manifest.json | head -1)
have=() miss=()
for ((i = 0; i < n; i++)); do
  p=$(printf 'part_%02d' "$i")
  if [ -f "$p.sha256" ]; then have+=("$p"); else miss+=("$p"); fi
done
gpu=""
if [ "${#have[@]}" -eq 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  gpu="; GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
fi
if [ "${#miss[@]}" -eq 0 ]; then
  echo "receive: $part ok; all $n parts here ($dst): run bash scripts/gpu_check/gpu_check.sh$gpu"
else
  echo "receive: $part ok; ${#have[@]}/$n parts here; missing: ${miss[*]}$gpu"
fi
