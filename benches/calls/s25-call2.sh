#!/bin/bash
# Session 25, call 2. Issue 16's case: the whole Qwen3-30B-A3B (48 layers), micro batch 4 x 2048,
# LoRA r8 on every linear and expert: trainer (slots laid out on the device, weights staged in
# pinned memory), and beside it transformers + peft where the card holds peft's 84 GiB (an H200).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
B=""; [ "$mem" -gt 100000 ] && B=peft
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 TRAINER_TIMEOUT=400 OUT=/tmp/bench
BASELINES=$B bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{" | tail -12
grep -h "weights built" /tmp/bench/*trainer*.log
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
true
