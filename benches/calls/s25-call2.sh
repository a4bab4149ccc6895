#!/bin/bash
# Session 25, call 2 (one command, ~8 min on an H200). (a) kernels-cubecl's routing tests on CUDA
# (the slots' layout, the fused combine f32 and bf16). (b) 30b-mb4 at 8 of 48 layers, trainer
# (weights staged in pinned memory: TRAINER_UPLOAD=pinned) beside transformers + peft. (c) Issue
# 16's case: the whole Qwen3-30B-A3B (48 layers), trainer, and beside it transformers + peft
# where the card holds peft's 84 GiB (an H200).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
PART=${PART:-abc}
if [[ $PART == *a* ]]; then
  timeout 120 .gpu/kc_routing --ignored --nocapture > $R/kc-routing.log 2>&1 || echo "FAILED: kc_routing"
  grep -E "^test |test result|panicked" $R/kc-routing.log | head -6; pack
fi
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
if [[ $PART == *b* ]]; then
  TRAINER_UPLOAD=pinned LAYERS=8 TRAINER_TIMEOUT=150 BASELINES=peft bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
  grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{" | tail -6
  grep -h "weights built" /tmp/bench/*trainer*.log
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
fi
if [[ $PART == *c* ]]; then
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
  B=""; [ "$mem" -gt 100000 ] && B=peft
  TRAINER_TIMEOUT=400 BASELINES=$B bash benches/run.sh 30b-mb4 > /tmp/bench48.out 2>&1
  grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench48.out | grep -v "^{" | tail -10
  grep -h "weights built" /tmp/bench/30b-mb4-trainer.log
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench48.out $R/ 2>/dev/null; pack
fi
true
