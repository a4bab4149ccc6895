#!/bin/bash
# Session 21, call 3. Issue 16: the CUDA parity tests (binary of b4c43b4; bf16 and f32 against transformers logits,
# the MoE fixtures included: routing on the device, gathers both ways, stacked experts), then
# Qwen3-30B-A3B at 8 of 48 layers beside transformers+peft with the profile.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
fail=0
for t in cuda_bf16_matches_transformers_within_bf16_rounding cuda_f32_matches_transformers_within_tf32_rounding; do
  timeout 200 .gpu/cuda_parity --ignored --exact "$t" --nocapture > $R/$t.log 2>&1 || { echo "FAILED: $t"; fail=1; }
  grep -iE "moe|error|max|test result" $R/$t.log | tail -8
done
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
BASELINES=peft PROFILE=1 bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{" 
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
exit $fail
