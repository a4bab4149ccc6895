#!/bin/bash
# Session 25, call 1 (one command, ~7 min). (a) kernels-cubecl's routing test on CUDA: the
# routed slots laid out on the device against the host layout. (b) 30b-mb4 at 8 of 48 layers:
# transformers + peft, trainer with the slots laid out on the host (TRAINER_ROUTING=host, the old
# path), trainer laid out on the device (the new default); weights staged in pinned memory.
# (c) A 2-layer step under ncu, one GPU time a kernel, summed by kernel over the last step
# (benches/ncu_summary.py). Outputs in one tarball.
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
PART=${PART:-abc}
if [[ $PART == *a* ]]; then
  timeout 120 .gpu/kc_routing --ignored --nocapture > $R/kc-routing.log 2>&1 || echo "FAILED: kc_routing"
  grep -E "test result|panicked|error" $R/kc-routing.log | head -4; pack
fi
if [[ $PART == *b* ]]; then
  export COMMIT=$(cat .gpu/COMMIT) LAYERS=8 WARMUP=1 STEPS=3 TRAINER_TIMEOUT=150 OUT=/tmp/bench
  TRAINER_ROUTING=host VARIANT=host-routing BASELINES=peft bash benches/run.sh 30b-mb4 > /tmp/bench.out 2>&1
  BASELINES= bash benches/run.sh 30b-mb4 >> /tmp/bench.out 2>&1
  grep -v "^\[transformers\]\|UserWarning\|Consider using\|losses.append" /tmp/bench.out | grep -v "^{" | tail -12
  grep -h "weights built" /tmp/bench/*trainer*.log
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench.out $R/ 2>/dev/null; pack
fi
if [[ $PART == *c* ]]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  echo "ncu: $NCU"
  timeout 240 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
    .gpu/trainer bench recipes/qwen3-moe-lora.toml --warmup 1 --steps 1 \
    --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"' \
    --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false \
    --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048 \
    --set model.config.num_hidden_layers=2 > $R/ncu.csv 2> $R/ncu.err
  echo "ncu rc=$?"; tail -3 $R/ncu.err
  python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; head -60 $R/ncu_summary.txt
  gzip -f $R/ncu.csv; pack
fi
true
