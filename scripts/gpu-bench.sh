#!/usr/bin/env bash
# The one-GPU benchmark set behind README's performance table: the Evoformer block at 128×256 and
# 512×384 (bf16, forward and forward+backward), the extra-MSA block at 1024×256, the 48-block stack
# with per-block remat, and the whole training step at the initial-training shape (eager and CUDA
# graph), then one line per result: what, pass, median ms, TFLOP/s, peak MiB.
#   FERROFOLD_BIN=path/to/ferrofold (a --features cuda build) scripts/gpu-bench.sh [log]
set -euo pipefail
F=${FERROFOLD_BIN:-target/release/ferrofold}
log=${1:-gpu-bench.log}
: >"$log"
bench() {
  local name=$1
  shift
  echo "== $name: $F $*" | tee -a "$log"
  "$F" "$@" 2>&1 | tee -a "$log" | grep '^RESULT' | sed "s/^RESULT /RESULT what=$name /" >>"$log.results"
}
rm -f "$log.results"
E=(bench evoformer --device cuda --dtype bf16)
bench block-128x256 "${E[@]}" --n-seq 128 --n-res 256 --iters 10 --warmup 3
bench block-512x384 "${E[@]}" --n-seq 512 --n-res 384 --iters 5 --warmup 2
bench extra-1024x256 "${E[@]}" --block extra --n-seq 1024 --n-res 256 --iters 5 --warmup 2
bench stack-48-remat "${E[@]}" --blocks 48 --remat block --passes fwd-bwd --iters 3 --warmup 1
bench step bench step --device cuda --graphs both --iters 3 --warmup 1
echo
printf '%-16s %-8s %10s %8s %9s\n' what pass median_ms TFLOP/s peak_MiB
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
while read -r line; do
  what=$(field "$line" what)
  pass=$(field "$line" pass)
  [ -n "$pass" ] || pass=$(field "$line" mode)
  ms=$(field "$line" median_ms)
  [ -n "$ms" ] || ms=$(field "$line" step_ms)
  printf '%-16s %-8s %10s %8s %9s\n' "$what" "$pass" "$ms" "$(field "$line" tflops)" "$(field "$line" peak_mib)"
done <"$log.results"
