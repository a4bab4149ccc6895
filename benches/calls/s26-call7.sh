#!/bin/bash
# Session 26, call 7 (~4 min): issue 17's case at full depth on the H100: Qwen2.5-7B (28 layers),
# micro batch 4 x 2048, LoRA r8 all-linear, trainer (blockwise attention, the default) beside
# transformers + peft with gradient checkpointing, one command.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
TRAINER_TIMEOUT=150 BASELINES=peft bash benches/run.sh 7b-mb4 > /tmp/bench-7b.out 2>&1
grep -E "^\| (trainer|transformers)|FAILED|rror" /tmp/bench-7b.out | tail -4
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench-7b.out $R/ 2>/dev/null; pack
true
