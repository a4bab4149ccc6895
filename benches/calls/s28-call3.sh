#!/bin/bash
# Session 28, call 3 (~5 min, binary of 4babfc7): (a) ncu over one launch of the ldmatrix
# forward (flash_forward_mma) in `trainer bench-attention`; (b) 7b-mb4 and 30b-mb4 at 8 layers,
# trainer alone, the three attention paths in turn (blockwise, flash-forward, flash), for which
# one `Auto` should take.
set -u
cd "$(dirname "$0")/../.."
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
source benches/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 ncu --clock-control none --kernel-name regex:flash_forward_mma --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis .gpu/trainer bench-attention --device cuda --kernel flash-forward --warmup 0 --steps 1 > $R/ncu-forward.txt 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Issue Slots Busy|Warp Cycles Per Issued|Executed Instructions  |Stall|Compute \(SM\) Th|Memory Through" $R/ncu-forward.txt | head -20; pack
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
for c in 7b-mb4 30b-mb4; do
  for k in blockwise flash-forward flash; do
    KERNELS_CUBECL_ATTENTION=$k VARIANT=$k LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench.out 2>&1
    cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
  done
done
python3 -c '
import json
for r in map(json.loads, open("/tmp/bench/results.jsonl")):
    print(r["case"], r.get("variant", ""), round(r.get("s_per_step") or 0, 4), r.get("peak_gib"))'
true
