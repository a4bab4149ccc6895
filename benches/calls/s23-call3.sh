#!/bin/bash
# Session 23, call 3 (not run in session 23: no device time left; the next session's first
# call, binaries rebuilt as benches/run.sh's header says, the kernels-cubecl test binary as
# .gpu/kc_linear). kernels-cubecl's GEMM tests on CUDA (the grouped GEMM, forward and both
# gradients, f32 and bf16: the weight gradient's fix of ff7f8b1); then Qwen3-30B-A3B at 8 of 48
# layers, trainer grouped (its bench self-check covers the grouped GEMM too, 9b5bd23), then the
# same binary padded (TRAINER_EXPERT_GEMM=padded). Results are copied to $OUT after each part.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
for t in cuda_f32_gemms_match_reference cuda_bf16_gemms_match_reference; do
  timeout 60 .gpu/kc_linear --ignored --exact "cuda::$t" --nocapture > $R/kc-$t.log 2>&1 || echo "FAILED: $t"
  grep -E "test result|panicked" $R/kc-$t.log | head -3
done
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=2 TRAINER_TIMEOUT=150 OUT=/tmp/bench
BASELINES= bash benches/run.sh 30b-mb4 2>&1 | grep -v "^{" | tail -3
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
TRAINER_EXPERT_GEMM=padded VARIANT=padded BASELINES= bash benches/run.sh 30b-mb4 2>&1 | grep -v "^{" | tail -3
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
true
