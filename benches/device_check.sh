#!/bin/bash
# Correctness on the GPU machine, before any timing: the CUDA test binaries carried in .gpu/
# (built here with `cargo test --release --features cuda --no-run`, stripped, xz'd: cuda_gemm,
# cuda_parity, cuda_layers, and kc_lce from kernels-cubecl; each runs when carried), then
# `trainer bench`'s self-checks
# (GEMMs against host f64 maths, GEMM ordering with CubeCL's kernels) on a small Qwen3, with the
# GEMMs on CubeCL's stream and synchronised. Any failure fails the command.
set -u
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/check}
mkdir -p "$OUT"
fail=0
check() {
  local name=$1; shift
  echo "== $name"
  if ! "$@" > "$OUT/$name.log" 2>&1; then echo "FAILED: $name"; fail=1; fi
  tail -4 "$OUT/$name.log"
}
for t in cuda_gemm kc_lce cuda_layers; do
  [ -x ".gpu/$t" ] && check "$t" timeout 300 ".gpu/$t" --ignored --test-threads=1 --nocapture
done
for order in stream sync; do
  env=(); [ $order = sync ] && env=(TRAINER_GEMM_ORDER=sync)
  check "bench-tiny-$order" env "${env[@]}" timeout 300 .gpu/trainer bench recipes/tiny-qwen3-moe-lora.toml \
    --set 'model.config.model_type="qwen3"' --set 'device="cuda"' --warmup 1 --steps 2
done
for t in cuda_bf16_matches_transformers_within_bf16_rounding cuda_f32_matches_transformers_within_tf32_rounding; do
  [ -x .gpu/cuda_parity ] && check "parity-$t" timeout 300 .gpu/cuda_parity --ignored --exact "$t" --nocapture
done
exit $fail
