#!/bin/bash
# Session 26, call 2 (~3 min): where the flash kernels' time goes. A 2-layer 30b-mb4 step under
# ncu: every kernel's time (summary as in session 25), then the flash kernels' launch statistics,
# occupancy and throughput sections (first launch of each).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
ARGS=(bench recipes/qwen3-moe-lora.toml --warmup 1 --steps 1
  --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"'
  --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false
  --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048
  --set model.config.num_hidden_layers=2)
timeout 200 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv .gpu/trainer "${ARGS[@]}" > $R/ncu.csv 2> $R/ncu.err
echo "ncu rc=$?"; tail -2 $R/ncu.err
python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; sed -n 1,25p $R/ncu_summary.txt
gzip -f $R/ncu.csv; pack
timeout 200 "$NCU" --clock-control none --kernel-name regex:flash --launch-count 3 \
  --section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  .gpu/trainer "${ARGS[@]}" > $R/ncu_flash.txt 2> $R/ncu_flash.err
echo "ncu2 rc=$?"
grep -E "flash_|Registers Per|Shared Memory Config|Dynamic Shared|Achieved Occupancy|Theoretical Occupancy|Duration|Compute \(SM\) Throughput|Memory Throughput|Local|Bank|Block Limit|Executed Ipc|Issue Slots" $R/ncu_flash.txt | head -80
pack
true
