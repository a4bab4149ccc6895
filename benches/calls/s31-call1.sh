#!/bin/bash
# Session 31, call 1 (~8 min), binaries of .gpu/COMMIT carried in .gpu/ (stripped, xz): trainer,
# cuda_master_weights, kc_attention (kernels-cubecl's attention tests).
# (a) the f32 master-weights fixture (torch's AdamW over f32 master weights of a tiny bf16 Qwen3,
# and the same loop without them), then trainer's CUDA test against it; (b) the register flash
# kernels' CUDA tests (cp.async two-stage walk; never run yet), each in its own process, with
# CubeCL's compilation log; (c) full-1.5b: full fine-tuning of Qwen2.5-1.5B, transformers' loop
# (f32 master weights, bf16 autocast, fused AdamW) beside trainer (bf16 weights, f32 masters);
# (d) tests/gpu/resume_check.sh with TUNING=full (master weights through a checkpoint); (e) with
# .gpu2/ carried too, s31-call2.sh --nvml-only (NVML's counters in a tiny CUDA run's metrics).
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export COMMIT=$(cat .gpu/COMMIT)
python3 tests/fixtures/make_master_weights_fixture.py tests/fixtures/master_weights 2>&1 | tail -6
cp -r tests/fixtures/master_weights $R/; pack
timeout 200 .gpu/cuda_master_weights --ignored --nocapture > $R/cuda_master_weights.log 2>&1 || echo "FAILED: cuda_master_weights"
grep -E "losses|torch  |moved|test result|panicked|assert" $R/cuda_master_weights.log | cut -c1-600 | head -12; pack
printf '[compilation]\nlogger = { level = "full", file = "/tmp/r/kernels.log" }\n' > cubecl.toml
for t in cuda_flash_forward_matches_reference cuda_flash_matches_reference; do
  timeout 200 .gpu/kc_attention --ignored --nocapture --exact cuda::$t >> $R/kc-attention.log 2>&1 || echo "FAILED: $t"
done
grep -E "^test |test result|panicked|max" $R/kc-attention.log | head -12 | cut -c1-400
printf '[compilation]\ncache = { file = ".cubecl-cache" }\n[autotune]\ncache = { file = ".cubecl-cache" }\n' > cubecl.toml
[ -f $R/kernels.log ] && xz -T8 -6 $R/kernels.log; pack
export OUT=/tmp/bench WARMUP=1 STEPS=3
TRAINER_TIMEOUT=240 bash benches/run.sh full-1.5b > /tmp/bench.out 2>&1
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
grep -E "FAILED|rror|\|" /tmp/bench.out | head -12
TUNING=full timeout 150 bash tests/gpu/resume_check.sh > $R/resume-full.log 2>&1 || echo "FAILED: resume_check full"
grep -E "tensors;|Error|error|rror:" $R/resume-full.log | head -4
cp -r .cubecl-cache $R/ 2>/dev/null; pack
[ -d .gpu2 ] && OUT=$R0 bash benches/calls/s31-call2.sh --nvml-only
