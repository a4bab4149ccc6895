#!/bin/bash
# kernels-cubecl's CUDA tests on the GPU machine, every CubeCL kernel on
# (as by default; KERNELS_CUBECL_CUDA_KERNELS=0 / KERNELS_CUBECL_ROW_KERNELS=0 would turn them off): the binaries carried in
# .gpu/kc_* (built here with `cargo test --release -p kernels-cubecl --features cuda --no-run`,
# stripped, xz'd). CubeCL's compilation log (the CUDA source of each kernel) goes to
# $OUT/cubecl-<test>.log; with SANITIZE=1 each binary also runs under compute-sanitizer.
# Any failing test fails the command.
set -u
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/kernel-check}
mkdir -p "$OUT"
unset KERNELS_CUBECL_CUDA_KERNELS KERNELS_CUBECL_ROW_KERNELS
fail=0
for bin in .gpu/kc_*; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  echo "== $name"
  if ! CUBECL_DEBUG_LOG="$OUT/cubecl-$name.log" timeout 240 "$bin" --ignored --test-threads=1 --nocapture > "$OUT/$name.log" 2>&1; then
    echo "FAILED: $name"; fail=1
  fi
  grep -E "^test |wrong|panicked|error" "$OUT/$name.log" | head -20
  if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer > /dev/null; then
    timeout 240 compute-sanitizer --print-limit 20 "$bin" --ignored --test-threads=1 > "$OUT/sanitize-$name.log" 2>&1
    grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/sanitize-$name.log" | head -8
  fi
done
exit $fail
