#!/bin/bash
# Session 23, call 1. Issue 16: the experts' GEMMs grouped (cublasGemmGroupedBatchedEx, every
# expert on exactly its rows), base and LoRA products. First the checks, any failure stops the
# call: kernels-cubecl's GEMM tests on CUDA (the grouped GEMM, forward and both gradients, f32
# and bf16, against Burn's matmul a group at a time), the CUDA parity tests (the MoE fixtures'
# logits against transformers, bf16 and f32), a 30-step CUDA run of the tiny MoE recipe. Then
# Qwen3-30B-A3B at 8 of 48 layers: transformers+peft, trainer grouped (profiled), the same
# binary padded (TRAINER_EXPERT_GEMM=padded, the layout before).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
fail=0
for t in cuda_f32_gemms_match_reference cuda_bf16_gemms_match_reference; do
  timeout 120 .gpu/kc_linear --ignored --exact "cuda::$t" --nocapture > $R/kc-$t.log 2>&1 || { echo "FAILED: $t"; fail=1; }
  grep -E "test result|panicked|error" $R/kc-$t.log | head -4
done
for t in cuda_bf16_matches_transformers_within_bf16_rounding cuda_f32_matches_transformers_within_tf32_rounding; do
  timeout 200 .gpu/cuda_parity --ignored --exact "$t" --nocapture > $R/$t.log 2>&1 || { echo "FAILED: $t"; fail=1; }
  grep -iE "moe|panicked|test result" $R/$t.log | tail -4
done
timeout 150 .gpu/trainer run recipes/tiny-qwen3-moe-lora.toml --set 'device="cuda"' --set train.max_steps=30 --set train.eval_interval=15 \
  --set logging.progress_bar=false --set checkpoint.output_dir=/tmp/tiny > $R/tiny.log 2>&1 || { echo "tiny run FAILED"; fail=1; }
grep -iE "eval|loss" $R/tiny.log | tail -4
[ $fail = 0 ] || exit 1
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
BASELINES=peft PROFILE=1 bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
TRAINER_EXPERT_GEMM=padded VARIANT=padded BASELINES= bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{"
grep -h "weights built\|loss" /tmp/bench/*trainer*.log | head -12
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
true
