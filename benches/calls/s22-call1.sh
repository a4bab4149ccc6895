#!/bin/bash
# Session 22, call 1. Issue 16: Qwen3-30B-A3B at 8 of 48 layers, trainer with stacked expert
# adapters (31dc63e: + the weight build in one pass) beside transformers+peft in one call; trainer's profiled steps follow its
# timed ones.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
export COMMIT=$(cat .gpu/COMMIT) LAYERS=${LAYERS:-8} WARMUP=1 STEPS=3 TRAINER_TIMEOUT=${TRAINER_TIMEOUT:-240} OUT=/tmp/bench
BASELINES=${BASELINES-peft} PROFILE=1 bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{"
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
true
