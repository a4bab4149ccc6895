#!/bin/bash
# Session 22, call 4. The experts' gate and up LoRA from one f32 copy of their input
# (d15e4f8) against the binary before it (31dc63e, .gpu/trainer-prev) at 8 layers in one call,
# then the whole 30B-A3B with d15e4f8.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=$OUT
export WARMUP=1 STEPS=3 TRAINER_TIMEOUT=300 OUT=/tmp/bench BASELINES=
LAYERS=8 COMMIT=31dc63e VARIANT=prev TRAINER=.gpu/trainer-prev bash benches/run.sh 30b-mb4 2>&1 | grep -v "^{" | tail -3
LAYERS=8 COMMIT=$(cat .gpu/COMMIT) bash benches/run.sh 30b-mb4 2>&1 | grep -v "^{" | tail -3
COMMIT=$(cat .gpu/COMMIT) bash benches/run.sh 30b-mb4 2>&1 | grep -v "^{" | tail -3
cp /tmp/bench/results.jsonl $R/
true
