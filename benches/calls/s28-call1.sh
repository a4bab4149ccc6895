#!/bin/bash
# Session 28, call 1 (~4 min; ~9 on an H200): kernels-cubecl's CUDA flash tests on this commit's register
# kernels (changed by review after their last CUDA check), each in its own process, with
# CubeCL's compilation log on (the generated CUDA source of every kernel, into kernels.log) so
# the register kernels' register use and spills can be read with ptxas off the GPU machine.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
printf '[compilation]\nlogger = { level = "full", file = "/tmp/r/kernels.log" }\n' > cubecl.toml
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
(which nvcc ptxas; ls /usr/local/cuda/bin | tr '\n' ' ') 2>&1 | head -3
timeout 200 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_forward_matches_reference > $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention flash-forward"
timeout 200 .gpu/kc_attention --ignored --nocapture --exact cuda::cuda_flash_matches_reference >> $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention flash"
grep -E "^test |test result|panicked|error" $R/kc-attention.log | head -8 | cut -c1-400
rm -f cubecl.toml
ls -la $R; xz -T8 -6 $R/kernels.log; pack
# The weights' upload, flat (this commit) against shaped (390cfbc, .gpu/trainer-base): 30b-mb4 at
# 8 layers, trainer alone, each binary once; `bench: weights built in` lines compared.
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
COMMIT=390cfbc VARIANT=shaped-upload TRAINER=.gpu/trainer-base LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
grep -h "weights built" /tmp/bench.out /tmp/bench/*.log 2>/dev/null | head -4
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; mkdir -p $R/l8; mv $R/results.jsonl $R/l8/ 2>/dev/null; rm -rf /tmp/bench; pack
# On an H200 only (peft's 84 GiB does not fit an H100): the whole Qwen3-30B-A3B (48 layers),
# trainer beside transformers + peft in one command, the comparison issue 16 asks for.
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${mem:-0}" -gt 100000 ]; then
  TRAINER_TIMEOUT=300 BASELINES=peft bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
  grep -E "FAILED|rror" /tmp/bench.out | head -5
  python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["commit"], r["impl"], r.get("s_per_step"), r.get("tokens_per_s"), r.get("peak_gib"), r.get("syncs_per_step"), r.get("host_wait_s_per_step"), r.get("gpu_busy"))'
fi
true
