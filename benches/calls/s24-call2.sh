#!/bin/bash
# Session 24, call 2. Issue 16's case on one H200: the whole Qwen3-30B-A3B (48 layers), micro
# batch 4 x 2048, LoRA r8 on every linear and expert, trainer with grouped expert GEMMs beside
# transformers+peft in one call; trainer's profiled steps follow its timed ones.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 TRAINER_TIMEOUT=400 OUT=/tmp/bench
BASELINES=peft PROFILE=1 bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{"
grep -h "weights built" /tmp/bench/*trainer*.log
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
true
