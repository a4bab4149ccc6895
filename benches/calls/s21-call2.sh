#!/bin/bash
# Session 21, call 2. Issue 16: Qwen3-30B-A3B at 8 of its 48 layers (full width) after the
# routing change (gathers both ways instead of select_assign), beside transformers+peft, with
# the per-op profile.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
BASELINES=peft PROFILE=1 bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out
cp /tmp/bench/results.jsonl /tmp/bench/*trainer*.log $R/ 2>/dev/null
true
