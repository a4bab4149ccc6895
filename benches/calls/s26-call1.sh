#!/bin/bash
# Session 26, call 1 (~6 min): (a) kernels-cubecl's attention tests on CUDA, the flash kernels
# among them (bf16 on tensor cores, f32 per element) against the f32 reference; (b) 30b-mb4 at 8
# of 48 layers: trainer with the flash kernels (attention self-check on) beside transformers +
# peft, then trainer on the blockwise path (KERNELS_CUBECL_ATTENTION=blockwise); (c) 7b-mb4 at
# 8 of 28 layers likewise (issue 17's case).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
timeout 240 .gpu/kc_attention --ignored --nocapture > $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention"
grep -E "^test |test result|panicked|relative error" $R/kc-attention.log | head -12; pack
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
for c in 30b-mb4 7b-mb4; do
  CHECK=1 LAYERS=8 TRAINER_TIMEOUT=200 BASELINES=peft bash benches/run.sh $c > /tmp/bench-$c.out 2>&1
  KERNELS_CUBECL_ATTENTION=blockwise VARIANT=blockwise LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench-$c.out 2>&1
  grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench-$c.out | grep -E "^\||self-check|FAILED|rror" | tail -12
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench-$c.out $R/ 2>/dev/null; pack
done
true
