#!/bin/bash
# Session 24, call 1b: what fits the few device minutes refused starts left. transformers'
# router load-balancing loss on the MoE fixtures and the new qwen2_moe_f32 fixture (CPU,
# seconds), then kernels-cubecl's GEMM tests on CUDA (the grouped GEMM's weight gradient fix of
# ff7f8b1), then, if the call lasts, trainer at 8 of 48 layers (grouped, profiled).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
python3 tests/fixtures/make_router_loss_fixtures.py tests/fixtures $R/router_loss > $R/router_loss.log 2>&1 || echo "router loss fixtures FAILED"
tail -2 $R/router_loss.log; pack
python3 tests/fixtures/make_fixtures.py /tmp/fx > $R/fixtures.log 2>&1 || echo "fixtures FAILED"
for c in qwen2_tied_f32 qwen3_moe_f32_sharded llama3_f32; do cmp tests/fixtures/$c/expected.safetensors /tmp/fx/$c/expected.safetensors && echo "$c: same"; done
cp -r /tmp/fx/qwen2_moe_f32 $R/ 2>/dev/null; pack
for t in cuda_f32_gemms_match_reference cuda_bf16_gemms_match_reference; do
  timeout 120 .gpu/kc_linear --ignored --exact "cuda::$t" --nocapture > $R/kc-$t.log 2>&1 || echo "FAILED: $t"
  grep -E "test result|panicked|error" $R/kc-$t.log | head -4
  pack
done
export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=200 OUT=/tmp/bench
BASELINES= PROFILE=1 VARIANT=profiled bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
grep -h "weights built" /tmp/bench/*trainer*.log
true
