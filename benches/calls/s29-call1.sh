#!/bin/bash
# Session 29, call 1 (~9 min), builds carried in .gpu/ (stripped, xz): trainer and kc_attention
# of this commit (the register flash kernels fed by cp.async, the next block's tiles copied while
# this one is computed, two-stage tiles with an mbarrier a half; exponentials as one fused
# multiply-add and ex2.approx; ldmatrix addresses as a lane's base plus a constant), *-v2 (the
# same without the address split), trainer-v1 (cp.async alone) and *-base (bfe50a2: synchronous
# loads whose addresses re-read the tensors' metadata at every vector).
# (a) kernels-cubecl's CUDA flash tests, each in its own process, this commit's first with
# CubeCL's compilation log (the kernels' CUDA source, for benches/kernel_regs.py); v2's if they
# fail, base's if v2's fail; (b) the attention core beside torch SDPA, this commit's paths and
# base's flash paths (v2's and v1's too where this commit's tests failed); (c) with the first
# build that passed: ncu over one launch of each register kernel, then 7b-mb4 at 8 layers,
# trainer alone, flash against blockwise.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
printf '[compilation]\nlogger = { level = "full", file = "/tmp/r/kernels.log" }\n' > cubecl.toml
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TESTS="cuda_flash_forward_matches_reference cuda_flash_matches_reference"
good=
for b in "" -v2 -base; do
  ok=1
  for t in $TESTS; do
    timeout 200 .gpu/kc_attention$b --ignored --nocapture --exact cuda::$t >> $R/kc-attention$b.log 2>&1 || { ok=; echo "FAILED ($b): $t"; }
  done
  grep -E "^test |test result|panicked|error|max" $R/kc-attention$b.log | head -12 | cut -c1-400
  if [ -z "$b" ]; then
    rm -f cubecl.toml; printf '[compilation]\ncache = { file = ".cubecl-cache" }\n[autotune]\ncache = { file = ".cubecl-cache" }\n' > cubecl.toml
    [ -f $R/kernels.log ] && xz -T8 -6 $R/kernels.log
  fi
  pack
  [ -n "$ok" ] && { good=${b:-.}; break; }
done
echo "first build to pass: ${good:-none}"
export COMMIT=$(cat .gpu/COMMIT)
OUT=/tmp/attn KERNELS="blockwise flash-forward flash" bash benches/attention.sh 2>&1 | tail -9
# The earlier builds' attention only where this commit's kernels failed their tests.
if [ "$good" != . ]; then
  COMMIT=$COMMIT-v2 TRAINER=.gpu/trainer-v2 OUT=/tmp/attn-v2 KERNELS="flash-forward flash" bash benches/attention.sh 2>&1 | tail -5
  COMMIT=$COMMIT-v1 TRAINER=.gpu/trainer-v1 OUT=/tmp/attn-v1 KERNELS="flash-forward flash" bash benches/attention.sh 2>&1 | tail -5
fi
COMMIT=bfe50a2 TRAINER=.gpu/trainer-base OUT=/tmp/attn-base KERNELS="flash-forward flash" bash benches/attention.sh 2>&1 | tail -5
cp -r /tmp/attn* $R/; pack
if [ -n "$good" ]; then
  b=${good#.}; T=.gpu/trainer$b
  timeout 150 ncu --clock-control none --kernel-name regex:'flash_(forward|backward_q|backward_kv)_mma' --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats $T bench-attention --device cuda --kernel flash --warmup 0 --steps 1 > $R/ncu-flash.txt 2>&1
  grep -E "flash_|Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Warp Cycles Per Issued|Executed Instructions  " $R/ncu-flash.txt | cut -c1-120 | head -30; pack
  [ -n "$b" ] && export COMMIT=$COMMIT$b
  export WARMUP=1 STEPS=3 OUT=/tmp/bench TRAINER=$T
  for c in 7b-mb4; do
    KERNELS_CUBECL_ATTENTION=flash VARIANT=flash LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
    LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
    cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
  done
  grep -E "FAILED|rror" /tmp/bench.out | head -5
  python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r["commit"], r["impl"], r.get("variant", ""), r.get("s_per_step"), r.get("tokens_per_s"), r.get("peak_gib"))'
fi
true
