#!/bin/bash
# Session 27, call 1 (~8 min): (a) 30b-mb4 at 8 layers, trainer (.gpu/trainer: the recomputed
# MoE layers replay their first pass's routing) beside transformers + peft and trainer of 3ab7bfe
# (.gpu/trainer-base: spread factor gradients, routing again in the replay), one command; (b) where the host's time
# goes in trainer's steady-state 30b-mb4-L8 step: gdb attached ~40 times to the unstripped binary
# (.gpu/trainer-sym; benches/host_samples.sh, aggregated by benches/host_profile.py); (c) a
# 2-layer step under ncu, every kernel's time (benches/ncu_summary.py).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=/tmp/r; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r.tgz -C $R . ; }
export COMMIT=$(cat .gpu/COMMIT) WARMUP=1 STEPS=3 OUT=/tmp/bench
c=30b-mb4
if [ -z "${SKIP_A:-}" ]; then
  LAYERS=8 TRAINER_TIMEOUT=150 BASELINES=peft bash benches/run.sh $c > /tmp/bench-$c.out 2>&1
  COMMIT=3ab7bfe VARIANT=replay-routes-afresh TRAINER=.gpu/trainer-base LAYERS=8 TRAINER_TIMEOUT=150 BASELINES= bash benches/run.sh $c >> /tmp/bench-$c.out 2>&1
  grep -E "^\| (trainer|transformers)|FAILED|rror" /tmp/bench-$c.out | tail -4
  python3 -c 'import json; [print(r["commit"], r["impl"], r.get("s_per_step"), r.get("syncs_per_step"), r.get("host_wait_s_per_step"), r.get("gpu_busy")) for r in map(json.loads, open("/tmp/bench/results.jsonl"))]'
  cp /tmp/bench/results.jsonl /tmp/bench/*.log /tmp/bench-$c.out $R/ 2>/dev/null; pack
fi
ARGS=(bench recipes/qwen3-moe-lora.toml
  --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"'
  --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false
  --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048)
# (b) host samples over steady-state steps
.gpu/trainer-sym "${ARGS[@]}" --warmup 1 --steps 400 --set model.config.num_hidden_layers=8 > $R/sampled.json 2> $R/sampled.log &
pid=$!
for i in $(seq 120); do grep -q "bench step 2" $R/sampled.log 2>/dev/null && break; sleep 1; done
grep "bench step 2" $R/sampled.log
timeout 150 bash benches/host_samples.sh $pid ${SAMPLES:-40} 0.3 > $R/host_samples.txt 2> $R/host_samples.err
kill $pid 2>/dev/null; wait $pid 2>/dev/null
grep "bench step" $R/sampled.log | tail -3
python3 benches/host_profile.py $R/host_samples.txt --top 60 > $R/host_profile.txt 2>&1; head -45 $R/host_profile.txt | cut -c1-160
pack
# (c) ncu over a 2-layer step
if [ -z "${SKIP_C:-}" ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv .gpu/trainer "${ARGS[@]}" --warmup 1 --steps 1 \
    --set model.config.num_hidden_layers=2 > $R/ncu.csv 2> $R/ncu.err
  python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; sed -n 3,12p $R/ncu_summary.txt
  gzip -f $R/ncu.csv; pack
fi
true
