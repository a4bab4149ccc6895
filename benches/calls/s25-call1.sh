#!/bin/bash
# Session 25, call 1. (a) A 2-layer Qwen3-30B-A3B step (micro batch 4 x 2048, LoRA r8 on every
# linear and expert) under ncu, one GPU time a kernel, summed by kernel over the last step
# (benches/ncu_summary.py): where the MoE layer's time goes, kernel by kernel. (b) The whole
# 48-layer model: trainer, and beside it transformers + peft where the card holds peft's 84 GiB
# (an H200); the weight build with pinned staging. Outputs in one tarball.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
PART=${PART:-ab}
if [[ $PART == *a* ]]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  echo "ncu: $NCU"
  timeout 300 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv --log-file $R/ncu.log \
    .gpu/trainer bench recipes/qwen3-moe-lora.toml --warmup 1 --steps 1 \
    --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"' \
    --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false \
    --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048 \
    --set model.config.num_hidden_layers=2 > $R/ncu.csv 2> $R/ncu.err
  echo "ncu rc=$?"; tail -3 $R/ncu.err
  python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; head -70 $R/ncu_summary.txt
  gzip -f $R/ncu.csv; pack
fi
if [[ $PART == *b* ]]; then
  mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)
  B=""; [ "$mem" -gt 100000 ] && B=peft
  export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 TRAINER_TIMEOUT=420 OUT=/tmp/bench
  BASELINES=$B bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
  grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{" | tail -20
  grep -h "weights built" /tmp/bench/*trainer*.log
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
fi
true
