#!/bin/bash
# Session 24, call 1 (session 23's calls 2/3 never started). kernels-cubecl's GEMM tests on CUDA
# (the grouped GEMM, forward and both gradients, f32 and bf16: ff7f8b1's fix of the weight
# gradient); a failure stops the call. Then Qwen3-30B-A3B at 8 of 48 layers: transformers+peft
# then trainer grouped (profiled) in one run.sh, then the same binary padded
# (TRAINER_EXPERT_GEMM=padded, session 22's layout); last a 30-step CUDA run of the tiny MoE
# recipe. Results are copied to $OUT after each part, so a call cut short keeps what ran.
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
[ $fail = 0 ] || exit 1
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
BASELINES=peft PROFILE=1 bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
TRAINER_EXPERT_GEMM=padded VARIANT=padded BASELINES= bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{"
grep -h "weights built" /tmp/bench/*trainer*.log
timeout 100 .gpu/trainer run recipes/tiny-qwen3-moe-lora.toml --set 'device="cuda"' --set train.max_steps=30 --set train.eval_interval=15 \
  --set logging.progress_bar=false --set checkpoint.output_dir=/tmp/tiny > $R/tiny.log 2>&1 || echo "tiny run FAILED"
tail -1 $R/tiny.log
true
