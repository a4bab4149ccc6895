#!/bin/bash
# Session 26, call 5 (~4 min): the flash kernels launched without bounds checks and with the
# mask's strides read once. (a) kernels-cubecl's attention tests on CUDA; (b) 30b-mb4 at 8
# layers, trainer with the flash kernels (self-check on) and on the blockwise path (the default);
# (c) a 2-layer 30b step under ncu, every kernel's time, then the first flash forward's warp
# states, instruction mix and source counters.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
timeout 240 .gpu/kc_attention --ignored --nocapture > $R/kc-attention.log 2>&1 || echo "FAILED: kc_attention"
grep -E "^test |test result|panicked|relative error|did not" $R/kc-attention.log | head -12; pack
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
c=30b-mb4
KERNELS_CUBECL_ATTENTION=flash VARIANT=flash CHECK=1 LAYERS=8 TRAINER_TIMEOUT=200 BASELINES= bash benches/run.sh $c > /tmp/bench-$c.out 2>&1
LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench-$c.out 2>&1
grep -E "^\| trainer|FAILED|rror" /tmp/bench-$c.out | tail -4
grep -h "self-checks" /tmp/bench/$c-L8-trainer-flash.log | cut -c1-400
cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench-$c.out $R/ 2>/dev/null; pack
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
ARGS=(bench recipes/qwen3-moe-lora.toml --warmup 1 --steps 1
  --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"'
  --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false
  --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048
  --set model.config.num_hidden_layers=2)
export KERNELS_CUBECL_ATTENTION=flash
timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv .gpu/trainer "${ARGS[@]}" > $R/ncu.csv 2> $R/ncu.err
python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; sed -n 3,10p $R/ncu_summary.txt
gzip -f $R/ncu.csv; pack
timeout 150 "$NCU" --clock-control none --kernel-name regex:flash_forward --launch-count 1 \
  --section WarpStateStats --section InstructionStats --section SourceCounters --section SpeedOfLight \
  .gpu/trainer "${ARGS[@]}" > $R/ncu_flash.txt 2> $R/ncu_flash.err
grep -E "Duration|Stall|stall|Warp Cycles|Executed Instructions|Issued" $R/ncu_flash.txt | head -30
pack
true
