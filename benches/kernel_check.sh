#!/bin/bash
# kernels-cubecl's CUDA tests on the GPU machine, every CubeCL kernel on (as by default:
# KERNELS_CUBECL_CUDA_KERNELS unset), each test in a process of its own (a process that made a bf16
# CUDA tensor keeps later f32 tests' tensors in bf16, seen 2026-12-02): the binaries carried in
# .gpu/kc_* (built here with `cargo test --release -p kernels-cubecl --features cuda --no-run`,
# stripped, xz'd). CubeCL's compilation log (the CUDA source of each kernel) goes to
# $OUT/cubecl-<test>.log; with SANITIZE=1 each binary also runs under compute-sanitizer.
# Any failing test fails the command.
set -u
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/kernel-check}
mkdir -p "$OUT"
unset KERNELS_CUBECL_CUDA_KERNELS
fail=0
for bin in .gpu/kc_*; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  echo "== $name"
  for t in $("$bin" --ignored --list 2>/dev/null | sed -n 's/: test$//p'); do
    if ! CUBECL_DEBUG_LOG="$OUT/cubecl-$name.log" timeout 240 "$bin" --ignored --exact "$t" --nocapture >> "$OUT/$name.log" 2>&1; then
      echo "FAILED: $name $t"; fail=1
    fi
  done
  grep -E "^test |wrong|panicked|error" "$OUT/$name.log" | head -20
  if [ "${SANITIZE:-0}" = 1 ] && command -v compute-sanitizer > /dev/null; then
    timeout 240 compute-sanitizer --print-limit 20 "$bin" --ignored --test-threads=1 > "$OUT/sanitize-$name.log" 2>&1
    grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/sanitize-$name.log" | head -8
  fi
done
exit $fail
