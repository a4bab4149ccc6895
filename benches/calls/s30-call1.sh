#!/bin/bash
# Session 30, call 1 (~9 min), binaries of the commit in .gpu/COMMIT carried in .gpu/ (stripped,
# xz): the register flash kernels fed by cp.async (two-stage walk, mbarriers, fast-math
# exponentials, split ldmatrix addresses), never yet run on CUDA; and .gpu2/ (f32 master weights).
# (a) kernels-cubecl's CUDA flash tests, each in its own process, with CubeCL's compilation log
# (the kernels' CUDA source, for benches/kernel_regs.py); (b) benches/calls/s30-call2.sh (master
# weights: fixture, CUDA test, resume checks); (c) the attention core beside torch SDPA, the
# three paths; (d) 7b-mb4 at 8 layers, trainer alone, flash against blockwise; (e) ncu over
# one launch of each register kernel.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
printf '[compilation]\nlogger = { level = "full", file = "/tmp/r/kernels.log" }\n' > cubecl.toml
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ok=1
for t in cuda_flash_forward_matches_reference cuda_flash_matches_reference; do
  timeout 200 .gpu/kc_attention --ignored --nocapture --exact cuda::$t >> $R/kc-attention.log 2>&1 || { ok=; echo "FAILED: $t"; }
done
grep -E "^test |test result|panicked|error|max" $R/kc-attention.log | head -12 | cut -c1-400
rm -f cubecl.toml; printf '[compilation]\ncache = { file = ".cubecl-cache" }\n[autotune]\ncache = { file = ".cubecl-cache" }\n' > cubecl.toml
[ -f $R/kernels.log ] && xz -T8 -6 $R/kernels.log; pack
OUT=$R0 bash benches/calls/s30-call2.sh
export COMMIT=$(cat .gpu/COMMIT)
OUT=/tmp/attn KERNELS="blockwise flash-forward flash" bash benches/attention.sh 2>&1 | tail -9
cp -r /tmp/attn $R/; pack
RESUME=full OUT=$R0 bash benches/calls/s30-call2.sh --resume-only
export WARMUP=1 STEPS=3 OUT=/tmp/bench
for k in flash blockwise; do
  KERNELS_CUBECL_ATTENTION=$k VARIANT=$k LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh 7b-mb4 >> /tmp/bench.out 2>&1
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
done
grep -E "FAILED|rror" /tmp/bench.out | head -5
python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["commit"], r["impl"], r.get("variant", ""), r.get("s_per_step"), r.get("tokens_per_s"), r.get("peak_gib"))'
timeout 120 ncu --clock-control none --kernel-name regex:'flash_(forward|backward_q|backward_kv)_mma' --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats .gpu/trainer bench-attention --device cuda --kernel flash --warmup 0 --steps 1 > $R/ncu-flash.txt 2>&1
grep -E "flash_|Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Warp Cycles Per Issued|Executed Instructions  |Stall Long" $R/ncu-flash.txt | cut -c1-120 | head -30
cp -r .cubecl-cache $R/ 2>/dev/null; pack
true
