#!/bin/bash
# Session 25, call 3 (~3 min): kernels-cubecl's routing tests on CUDA after the strided fix (the
# layout, the fused combine f32 and bf16, the row gather is covered by the model run); trainer at
# 8 of 48 layers alone (peft's row: calls 1 and 2, 0.336-0.338 s/step on an H100); a 2-layer step
# under ncu (as call 1).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
timeout 120 .gpu/kc_routing --ignored --nocapture > $R/kc-routing.log 2>&1 || echo "FAILED: kc_routing"
grep -E "^test |test result|panicked|max error" $R/kc-routing.log | head -8; pack
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
grep -v "^{" /tmp/bench.out | tail -5
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
[ -n "${SKIP_NCU:-}" ] || OUT=$R0 PART=c bash benches/calls/s25-call1.sh > /dev/null 2>&1
[ -f /tmp/r/ncu_summary.txt ] && head -40 /tmp/r/ncu_summary.txt
pack
true
