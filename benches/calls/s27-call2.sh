#!/bin/bash
# Session 27, call 2 (~4 min, same warm machine as call 1): (a) where the host's time goes in
# trainer's steady-state 30b-mb4-L8 step: gdb attached ~40 times to the unstripped binary
# (.gpu/trainer-sym; benches/host_samples.sh, aggregated by benches/host_profile.py: both removed
# after this call, in git history at d0c2b62: the machine's only gdb, cuda-gdb, crashed the CUDA
# process at its first attach); (b) a 2-layer
# step under ncu with KERNELS_CUBECL_ATTENTION=${ATTN:-flash-forward}, every kernel's time
# (benches/ncu_summary.py).
set -u
cd "$(dirname "$0")/../.."
source benches/env.sh
R=/tmp/r2; mkdir -p $R; R0=$OUT; pack() { tar czf $R0/r2.tgz -C $R . ; }
ARGS=(bench recipes/qwen3-moe-lora.toml
  --set 'model.path="tests/data/qwen3-30b-a3b"' --set 'model.init="random"' --set 'device="cuda"'
  --set parallel.data=1 --set parallel.tensor=1 --set parallel.expert=1 --set parallel.sequence_parallel=false
  --set lora.dropout=0.0 --set train.micro_batch_size=4 --set train.global_batch_size=4 --set train.max_length=2048)
.gpu/trainer-sym "${ARGS[@]}" --warmup 1 --steps 400 --set model.config.num_hidden_layers=8 > $R/sampled.json 2> $R/sampled.log &
pid=$!
for i in $(seq 120); do grep -q "bench step 2" $R/sampled.log 2>/dev/null && break; sleep 1; done
timeout 120 bash benches/host_samples.sh $pid ${SAMPLES:-40} 0.3 > $R/host_samples.txt 2> $R/host_samples.err
kill $pid 2>/dev/null; wait $pid 2>/dev/null
grep "bench step" $R/sampled.log | tail -2
python3 benches/host_profile.py $R/host_samples.txt --top 60 > $R/host_profile.txt 2>&1; head -50 $R/host_profile.txt | cut -c1-150
pack
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
KERNELS_CUBECL_ATTENTION=${ATTN:-flash-forward} timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv .gpu/trainer "${ARGS[@]}" --warmup 1 --steps 1 \
  --set model.config.num_hidden_layers=2 > $R/ncu.csv 2> $R/ncu.err
python3 benches/ncu_summary.py $R/ncu.csv > $R/ncu_summary.txt 2>&1; sed -n 3,14p $R/ncu_summary.txt
grep -i "flash\|softmax_rows" $R/ncu_summary.txt | head -8
gzip -f $R/ncu.csv; pack
true
