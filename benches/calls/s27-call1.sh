#!/bin/bash
# Session 27, call 1 (~7 min): (a) kernels-cubecl's CUDA flash tests, each alone: the forward
# with its accumulators in registers (flash_forward_mma) with the blockwise backward, then with
# the flash backward (the queries' gradient in registers too, flash_backward_q_mma); (b) the
# attention core alone at Qwen2.5-7B's shapes, causal and packed, torch SDPA beside trainer's
# paths (benches/attention.sh); (c) 30b-mb4 at 8 layers, one command: trainer (.gpu/trainer: the
# recomputed MoE layers replay their first pass's routing) beside transformers + peft and trainer
# of 3ab7bfe (.gpu/trainer-base: routing again in the replay), then trainer with
# KERNELS_CUBECL_ATTENTION=flash-forward if (a) passed.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
flash_ok=1
timeout 150 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_forward_matches_reference > $R/kc-attention.log 2>&1 || { flash_ok=; echo "FAILED: kc_attention flash-forward"; }
timeout 150 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_matches_reference >> $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention flash"
grep -E "^test |test result|panicked|error" $R/kc-attention.log | head -8 | cut -c1-400; pack
export COMMIT=$(cat .gpu/COMMIT)
OUT=/tmp/attn KERNELS="blockwise flash-forward flash" bash benches/attention.sh 2>&1 | tail -9
cp -r /tmp/attn $R/; pack
export WARMUP=1 STEPS=3 OUT=/tmp/bench
c=30b-mb4
LAYERS=8 TRAINER_TIMEOUT=150 BASELINES=peft bash benches/run.sh $c > /tmp/bench.out 2>&1
[ -z "${SKIP_BASE:-}" ] && COMMIT=3ab7bfe VARIANT=replay-routes-afresh TRAINER=.gpu/trainer-base LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
if [ -n "$flash_ok" ]; then
  KERNELS_CUBECL_ATTENTION=flash-forward VARIANT=flash-forward LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
fi
grep -E "FAILED|rror" /tmp/bench.out | head -5
python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["commit"], r["impl"], r.get("variant", ""), r.get("s_per_step"), r.get("tokens_per_s"), r.get("peak_gib"), r.get("syncs_per_step"), r.get("host_wait_s_per_step"), r.get("gpu_busy"))'
true
